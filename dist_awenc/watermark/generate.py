"""Stage 1 (METHOD.md), the owner's stage: the secret (key + universal watermark) on the frozen f0.

The optimiser is :mod:`dist_awenc.watermark.perturbation` (``L_gen``, PGD or
Adam, ``robust.transforms``); ``rehearsal`` adds surrogate derivatives and
reference encoders (:mod:`dist_awenc.watermark.rehearsal`). This stage draws
the key, generates the owner's secret and the J alternative secrets by the
same procedure, fixes the verification plan and writes the secret files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dist_awenc.config import GenerationSection, WatermarkConfig
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.data.stream import Images, IndexedImages
from dist_awenc.encoders.io import Encoder, atomic_write_text, load_encoder, read_state, save_tensors
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.log import info
from dist_awenc.runs import open_run
from dist_awenc.verify.plan import make_plan
# the optimiser, re-exported: callers import it from here or from perturbation
from dist_awenc.watermark.perturbation import (Rehearsal, Transform, check_generation, choose_key, generate_delta,  # noqa: F401
                                               generate_deltas, generation_loss, mark_statistics)
from dist_awenc.watermark.rehearsal import check_rehearsal, prepare_rehearsal
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, save_alternatives, save_secret
from dist_awenc.watermark.transforms import TransformParams, make_transform


STATISTICS_IMAGES = 2048  # generation.json's hold-out statistics: the first this many hold-out images (a report, not a test)


def alternative_seeds(owner_seed: int, count: int) -> list[int]:
    """J seeds for the alternative secrets, derived from the owner's and never equal to it."""
    state = np.random.SeedSequence([int(owner_seed), 0xA17E]).generate_state(count + 1, dtype=np.uint32)
    return [int(s) for s in state if int(s) != int(owner_seed)][:count]


def generate_alternatives(encoder: Encoder, pool: Images, g: GenerationSection, owner_seed: int, count: int,
                          work_dir: Path, chunk: int = 16, *, transform: Optional[Transform],
                          rehearsal: Optional[Rehearsal] = None) -> AlternativeSecrets:
    """J alternative secrets by exactly the owner's procedure (key draw + stage 1) with other seeds.

    ``transform`` is required (None: none) and, like ``rehearsal``, must be the owner's:
    alternatives made another way would not be exchangeable with the owner's secret.

    Generated ``chunk`` at a time; each finished chunk is saved under
    ``work_dir``, so an interrupted run resumes where it stopped.
    """
    seeds = alternative_seeds(owner_seed, count)
    work_dir.mkdir(parents=True, exist_ok=True)
    keys_all, deltas_all = [], []
    for start in range(0, count, chunk):
        part = seeds[start : start + chunk]
        path = work_dir / f"chunk_{start:06d}_{len(part)}.safetensors"
        if path.exists():
            t = read_state(path)
            keys, deltas = t["keys"], t["deltas"]
        else:
            keys = torch.stack([choose_key(g.key, pool, s)[0] for s in part])
            deltas, _ = generate_deltas(encoder, pool, keys, part, eps=g.eps, alpha=g.alpha, steps=g.steps,
                                        step_size=g.step_size, batch_size=g.batch_size, optimizer=g.optimizer,
                                        desc=f"alternatives {start + len(part)}/{count}", transform=transform,
                                        rehearsal=rehearsal)
            save_tensors(path, {"keys": keys, "deltas": deltas})
        keys_all.append(keys)
        deltas_all.append(deltas)
    return AlternativeSecrets(keys=torch.cat(keys_all), deltas=torch.cat(deltas_all), seeds=seeds,
                              control_seeds=[control_seed_of(s) for s in seeds])


def _primary(pl) -> dict[str, str]:
    return {"weights": "whitebox", "probabilities": pl.primary_probabilities, "labels": pl.primary_labels}


def control_seed_of(seed: int) -> int:
    """The control permutation's seed for a secret generated with ``seed`` (owner and alternatives alike)."""
    return int(seed) + 7919


def watermark(cfg: WatermarkConfig) -> Path:
    """Generate the owner's secret on f0 with its verification plan (and the J alternative secrets).

    Writes ``secret.safetensors`` + ``secret.json`` and, with ``plan.alternatives`` = J > 0,
    ``alternatives.safetensors``, whose hash the plan records.
    """
    g, pl = cfg.generation, cfg.plan
    n = {"whitebox": pl.n_whitebox, "blackbox_score": pl.n_score, "blackbox_label": pl.n_label,
         "blackbox_collapse": pl.n_collapse}
    make_plan(dataset=cfg.data.name, dataset_size=1, image_size=cfg.data.image_size, split_seed=cfg.data.split_seed,
              holdout_indices=np.zeros(0), n=n, alpha=pl.alpha, alternatives=pl.alternatives, alternatives_sha256=None,
              primary_mode=pl.primary_mode, primary=_primary(pl))  # checks the plan's values before anything is written
    check_generation(g.eps, g.steps, g.step_size, g.batch_size, g.optimizer)
    if g.key not in ("image", "noise"):
        raise ConfigError(f"generation.key must be image or noise, not '{g.key}'")
    robust = TransformParams.of(cfg.robust)
    transform = make_transform(robust)  # one transform for the owner's secret and its alternatives alike
    rh = cfg.rehearsal
    check_rehearsal(rh.surrogates, rh.references, rh.reference_weight, rh.reference_archs)
    encoder, card = load_encoder(cfg.encoder)
    if card["input_size"] != cfg.data.image_size:
        raise ArtifactError(f"encoder was trained at {card['input_size']} px but data.image_size={cfg.data.image_size}")
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "watermark", "pretrain", "holdout")
    # nothing is decoded here: stage 1 decodes the images each step draws, the statistics their hold-out prefix
    pool = IndexedImages(dataset, splits["pretrain"], num_workers=cfg.data.num_workers)
    holdout = IndexedImages(dataset, splits["holdout"][:STATISTICS_IMAGES], num_workers=cfg.data.num_workers)
    with open_run(cfg, "watermark") as run_dir:
        rehearsal, rehearsal_record = prepare_rehearsal(encoder, card, cfg, dataset, splits["pretrain"], run_dir / "rehearsal")
        key, key_source = choose_key(g.key, pool, cfg.run.seed)
        delta, history = generate_delta(encoder, pool, key, eps=g.eps, alpha=g.alpha, steps=g.steps, step_size=g.step_size,
                                        batch_size=g.batch_size, optimizer=g.optimizer, seed=cfg.run.seed,
                                        transform=transform, rehearsal=rehearsal)
        alt_sha = None
        if pl.alternatives:
            alt = generate_alternatives(encoder, pool, g, cfg.run.seed, pl.alternatives, run_dir / "alternatives.parts",
                                        transform=transform, rehearsal=rehearsal)
            alt_sha = save_alternatives(alt, run_dir / "alternatives.safetensors")
        plan = make_plan(dataset=cfg.data.name, dataset_size=len(dataset), image_size=cfg.data.image_size,
                         split_seed=cfg.data.split_seed, holdout_indices=splits["holdout"], n=n, alpha=pl.alpha,
                         alternatives=pl.alternatives, alternatives_sha256=alt_sha, primary_mode=pl.primary_mode,
                         primary=_primary(pl))
        meta = {"encoder_sha256": card.get("sha256"), "alpha": g.alpha, "key_source": key_source,
                "dataset": cfg.data.name, "seed": cfg.run.seed}
        if robust.enabled:  # only when on: a secret made without transforms keeps its bytes and hash
            meta["robust"] = robust.record()  # the owner's secret and its alternatives alike
        if rehearsal_record:  # likewise only when on
            meta["rehearsal"] = rehearsal_record
        secret = Secret(key=key, delta=delta, eps=g.eps, control_seed=control_seed_of(cfg.run.seed), meta=meta, plan=plan)
        save_secret(secret, run_dir / "secret")
        stats = {**mark_statistics(encoder, holdout, secret), "images": len(holdout)}
        atomic_write_text(run_dir / "generation.json", json.dumps(
            {"secret_sha256": secret.sha256, "loss_first": history[0], "loss_last": history[-1], "holdout": stats,
             "alternatives": pl.alternatives, "alternatives_sha256": alt_sha,
             **({"robust": robust.record()} if robust.enabled else {}),
             **({"rehearsal": rehearsal_record} if rehearsal_record else {})}, indent=2))
        info(f"secret {secret.sha256[:12]}  holdout cos(marked, key) {stats['cos_marked_key']:.3f} "
             f"vs control {stats['cos_control_key']:.3f}  -> {run_dir / 'secret.safetensors'}"
             + (f" (+ {pl.alternatives} alternative secrets)" if pl.alternatives else ""))
    return run_dir / "secret.safetensors"


