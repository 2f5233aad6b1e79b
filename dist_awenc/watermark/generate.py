"""Stage 1 (METHOD.md), the owner's stage: the secret (key + universal watermark) on the frozen f0.

The optimiser is :mod:`dist_awenc.watermark.perturbation` (``L_gen``, PGD or
Adam, ``robust.transforms``); ``rehearsal`` adds surrogate derivatives and
reference encoders (:mod:`dist_awenc.watermark.rehearsal`). This stage makes
J + 1 candidate secrets by the same procedure (key draw + stage 1), draws the
owner's among them by a digest of all of them (the others are the J
alternative secrets), fixes the verification plan and writes the secret files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

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
from dist_awenc.watermark.draw import (TWIN_STREAM_FACTOR, alternative_seeds, candidate_seeds,  # noqa: F401
                                       distinct_candidates, draw_digest, owner_draw_record)
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, control_of, save_alternatives, save_secret
from dist_awenc.watermark.transforms import TransformParams, make_transform


STATISTICS_IMAGES = 2048  # generation.json's hold-out statistics: the first this many hold-out images (a report, not a test)


class Candidates(NamedTuple):
    """The J + 1 candidate secrets of stage 1, in seed order (keys and deltas (J+1, 3, S, S))."""

    seeds: list[int]
    keys: torch.Tensor
    deltas: torch.Tensor
    history: list[list[float]]  # each candidate's loss per step
    key_sources: list[str]


def generate_candidates(encoder: Encoder, pool: Images, g: GenerationSection, seeds: list[int], work_dir: Path,
                        chunk: int = 16, *, transform: Optional[Transform],
                        rehearsal: Optional[Rehearsal] = None, offset: int = 0) -> Candidates:
    """One secret per seed by exactly the same procedure (key draw + stage 1): the owner's and the alternatives'.

    ``transform`` is required (None: none) and, like ``rehearsal``, is the same for every
    candidate: secrets made another way would not be exchangeable with one another.

    Generated ``chunk`` at a time; each finished chunk is saved under ``work_dir``
    (with its seeds, checked on reading), so an interrupted run resumes where it stopped; ``offset``: the first
    seed's position in the whole stream (it names the chunks).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    keys_all, deltas_all, history, sources = [], [], [], []
    for start in range(0, len(seeds), chunk):
        part = [int(s) for s in seeds[start : start + chunk]]
        path = work_dir / f"chunk_{offset + start:06d}_{len(part)}.safetensors"
        header = _chunk_header(path)
        if header.get("seeds") == part:
            t = read_state(path)
            keys, deltas, hist, src = t["keys"], t["deltas"], t["history"].tolist(), header["key_sources"]
        else:
            picks = [choose_key(g.key, pool, s) for s in part]
            keys, src = torch.stack([k for k, _ in picks]), [source for _, source in picks]
            deltas, hist = generate_deltas(encoder, pool, keys, part, eps=g.eps, alpha=g.alpha, steps=g.steps,
                                           step_size=g.step_size, batch_size=g.batch_size, optimizer=g.optimizer,
                                           desc=f"secrets {offset + start + len(part)}/{offset + len(seeds)}",
                                           transform=transform,
                                           rehearsal=rehearsal)
            save_tensors(path, {"keys": keys, "deltas": deltas, "history": torch.tensor(hist, dtype=torch.float64)},
                         metadata={"dist_awenc": json.dumps({"seeds": part, "key_sources": src})})
        keys_all.append(keys)
        deltas_all.append(deltas)
        history += hist
        sources += src
    return Candidates([int(s) for s in seeds], torch.cat(keys_all), torch.cat(deltas_all), history, sources)


def distinct_candidate_set(encoder: Encoder, pool: Images, g: GenerationSection, run_seed: int, alternatives: int,
                           twin_cosine: float, work_dir: Path, *, transform: Optional[Transform],
                           rehearsal: Optional[Rehearsal] = None) -> tuple[Candidates, list[int]]:
    """The J + 1 candidates and the seeds skipped as twins: candidates are made from ``candidate_seeds(run_seed, .)``
    in order and each is kept unless its watermark has cosine above ``twin_cosine`` with one kept before it
    (:func:`~dist_awenc.watermark.draw.distinct_candidates`); skipped ones are replaced by the stream's next seeds
    until J + 1 are kept. ``twin_cosine`` 1: the rule is off, the first J + 1 seeds are the candidates.

    Universal perturbations on one f0 share its most sensitive directions: near-twins are common (at the demo's
    scale 37% of candidates have another above cosine 0.7), and a twin of the owner's secret competes with it in
    every derivative's permutation test. The rule is applied to the whole set before the draw, so the draw is
    still a digest of the final set and independent of every statistic.

    Raises:
        ArtifactError: J + 1 pairwise-distinct candidates were not found among ``TWIN_STREAM_FACTOR`` x (J + 1).
    """
    n = alternatives + 1
    made = generate_candidates(encoder, pool, g, candidate_seeds(run_seed, alternatives), work_dir,
                               transform=transform, rehearsal=rehearsal)
    kept = distinct_candidates(made.deltas, twin_cosine, n)
    while len(kept) < n:
        total = len(made.seeds)
        if total >= TWIN_STREAM_FACTOR * n:
            raise ArtifactError(f"plan.twin_cosine={twin_cosine:g}: {total} candidates made and only {len(kept)} of "
                                f"the {n} needed have no twin above it; raise plan.twin_cosine (1 turns the rule off)")
        more = candidate_seeds(run_seed, total + n - len(kept) - 1)[total:]
        info(f"twin rule: {total - len(kept)} of {total} candidates skipped (watermark cosine above {twin_cosine:g} "
             f"with an earlier one); making {len(more)} more")
        extra = generate_candidates(encoder, pool, g, more, work_dir, transform=transform, rehearsal=rehearsal,
                                    offset=total)
        made = Candidates(made.seeds + extra.seeds, torch.cat([made.keys, extra.keys]),
                          torch.cat([made.deltas, extra.deltas]), made.history + extra.history,
                          made.key_sources + extra.key_sources)
        kept = distinct_candidates(made.deltas, twin_cosine, n)
    kept_set = set(kept)
    skipped = [s for j, s in enumerate(made.seeds) if j not in kept_set]  # every seed made is kept or skipped
    return Candidates([made.seeds[j] for j in kept], made.keys[kept], made.deltas[kept],
                      [made.history[j] for j in kept], [made.key_sources[j] for j in kept]), skipped


def _chunk_header(path: Path) -> dict:
    """A saved chunk's seeds and key sources ({} when there is no readable chunk)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("dist_awenc", "{}"))
    except (OSError, ValueError, SafetensorError):
        return {}


def f0_baselines(encoder: Encoder, c: Candidates, dataset, holdout_indices) -> torch.Tensor:
    """f0's mean white-box score with every candidate on the plan's white-box hold-out images, (J + 1,) float64.

    The permutation test ranks each secret's excess over f0's response to it: a fixed function of each secret
    alike, so the owner's is still exchangeable with the alternatives under H0, while the part of a suspect's
    response that merely follows f0's (some secrets transfer better than others) cancels.
    """
    from dist_awenc.verify.permutation import whitebox_statistics

    images, _ = dataset.get_batch(holdout_indices)
    controls = torch.stack([control_of(d, control_seed_of(s)) for d, s in zip(c.deltas, c.seeds)])
    return torch.from_numpy(whitebox_statistics(encoder, c.keys, c.deltas, controls, images))


def _primary(pl) -> dict[str, str]:
    return {"weights": "whitebox", "probabilities": pl.primary_probabilities, "labels": pl.primary_labels}


def control_seed_of(seed: int) -> int:
    """The control permutation's seed for a secret generated with ``seed`` (owner and alternatives alike)."""
    return int(seed) + 7919


def watermark(cfg: WatermarkConfig) -> Path:
    """Generate the owner's secret on f0 with its verification plan (and the J alternative secrets).

    Writes ``secret.safetensors`` + ``secret.json`` and, with ``plan.alternatives`` = J > 0,
    ``alternatives.safetensors``, whose hash the plan records with the owner's draw
    (:func:`~dist_awenc.watermark.draw.check_owner_draw` recomputes it).
    """
    g, pl = cfg.generation, cfg.plan
    n = {"whitebox": pl.n_whitebox, "blackbox_score": pl.n_score, "blackbox_label": pl.n_label,
         "blackbox_collapse": pl.n_collapse}
    make_plan(dataset=cfg.data.name, dataset_size=1, image_size=cfg.data.image_size, split_seed=cfg.data.split_seed,
              holdout_indices=np.zeros(0), n=n, alpha=pl.alpha, alternatives=pl.alternatives, alternatives_sha256=None,
              primary_mode=pl.primary_mode, primary=_primary(pl), resize=pl.resize,  # checks the plan's values before
              score_statistic=pl.score_statistic, whitebox_statistic=pl.whitebox_statistic,  # anything is written
              label_statistic=pl.label_statistic)
    check_generation(g.eps, g.steps, g.step_size, g.batch_size, g.optimizer)
    if not 0 < pl.twin_cosine <= 1:
        raise ConfigError(f"plan.twin_cosine must be in (0, 1] (1: no twin rule), got {pl.twin_cosine}")
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
        draw, alt_sha = None, None
        if pl.alternatives:
            # the owner does not choose the secret: J + 1 candidates are made alike and a digest of all of them
            # draws the owner's; the others, in order, are the alternatives (METHOD.md, stage 3, item 1)
            c, skipped = distinct_candidate_set(encoder, pool, g, cfg.run.seed, pl.alternatives, pl.twin_cosine,
                                                run_dir / "candidates.parts", transform=transform, rehearsal=rehearsal)
            draw = owner_draw_record(cfg.run.seed, c.seeds, draw_digest(c.seeds, c.keys, c.deltas),
                                     twin_cosine=pl.twin_cosine, skipped=skipped)
            i = draw["index"]
            seed, key, delta = c.seeds[i], c.keys[i].clone(), c.deltas[i].clone()
            history, key_source = c.history[i], c.key_sources[i]
            rest = [j for j in range(len(c.seeds)) if j != i]
            base = f0_baselines(encoder, c, dataset, splits["holdout"][:pl.n_whitebox])
            alt = AlternativeSecrets(keys=c.keys[rest], deltas=c.deltas[rest], seeds=[c.seeds[j] for j in rest],
                                     control_seeds=[control_seed_of(c.seeds[j]) for j in rest],
                                     baselines=base[rest], owner_baseline=float(base[i]),
                                     baseline_images=min(pl.n_whitebox, len(splits["holdout"])))
            alt_sha = save_alternatives(alt, run_dir / "alternatives.safetensors")
        else:  # plan.alternatives = 0: nothing to draw from, the one secret made with run.seed (no owner_draw in the plan)
            seed = cfg.run.seed
            key, key_source = choose_key(g.key, pool, seed)
            delta, history = generate_delta(encoder, pool, key, eps=g.eps, alpha=g.alpha, steps=g.steps, step_size=g.step_size,
                                            batch_size=g.batch_size, optimizer=g.optimizer, seed=seed,
                                            transform=transform, rehearsal=rehearsal)
        plan = make_plan(dataset=cfg.data.name, dataset_size=len(dataset), image_size=cfg.data.image_size,
                         split_seed=cfg.data.split_seed, holdout_indices=splits["holdout"], n=n, alpha=pl.alpha,
                         alternatives=pl.alternatives, alternatives_sha256=alt_sha, primary_mode=pl.primary_mode,
                         primary=_primary(pl), owner_draw=draw, resize=pl.resize,
                         score_statistic=pl.score_statistic, whitebox_statistic=pl.whitebox_statistic,
                         label_statistic=pl.label_statistic)
        meta = {"encoder_sha256": card.get("sha256"), "alpha": g.alpha, "key_source": key_source,
                "dataset": cfg.data.name, "seed": seed}
        if robust.enabled:  # only when on: a secret made without transforms keeps its bytes and hash
            meta["robust"] = robust.record()  # the owner's secret and its alternatives alike
        if rehearsal_record:  # likewise only when on
            meta["rehearsal"] = rehearsal_record
        secret = Secret(key=key, delta=delta, eps=g.eps, control_seed=control_seed_of(seed), meta=meta, plan=plan)
        save_secret(secret, run_dir / "secret")
        stats = {**mark_statistics(encoder, holdout, secret), "images": len(holdout)}
        atomic_write_text(run_dir / "generation.json", json.dumps(
            {"secret_sha256": secret.sha256, "loss_first": history[0], "loss_last": history[-1], "holdout": stats,
             "alternatives": pl.alternatives, "alternatives_sha256": alt_sha,
             **({"robust": robust.record()} if robust.enabled else {}),
             **({"rehearsal": rehearsal_record} if rehearsal_record else {})}, indent=2))
        info(f"secret {secret.sha256[:12]}  holdout cos(marked, key) {stats['cos_marked_key']:.3f} "
             f"vs control {stats['cos_control_key']:.3f}  -> {run_dir / 'secret.safetensors'}"
             + (f" (drawn as candidate {draw['index']} of {draw['candidates']}; + {pl.alternatives} alternative secrets"
                + (f"; {len(draw['skipped'])} twins skipped" if draw.get("skipped") else "") + ")" if draw else ""))
    return run_dir / "secret.safetensors"


