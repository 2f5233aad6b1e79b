"""Suite ``cost``: device-seconds of watermarking as a fraction of the pre-training it protects.

For a scenario (a pre-training config and the watermark / embedding configs
that go with it):

    pretrain_s  = pre-training images (epochs x pretrain split, as TrainPlan counts them) / measured pretrain images/s
    watermark_s = generation.steps x generation.batch_size / measured generation images/s
    embed_s     = embedding images (its epochs x the same split) / measured embedding images/s
    fraction    = (watermark_s + embed_s) / pretrain_s

Rates are the project's own (``fit`` on an in-memory batch, as in the
``step`` suite; ``generate_delta`` for stage 1) on this device, measured at a
per-device batch that fits it; device-seconds are the same on 1 or N devices
where the run scales linearly. Scenarios without a config file of their own
use the stage's defaults (``awenc config watermark`` / ``embed``).

The recipe rows (``--scenarios recipe``; issue #27 item 4) price the embedding
recipe (``robust.transforms=[jpeg,resize,crop,noise,blur] robust.p_identity=0.5``
in both stages, ``shadow.weight=1 shadow.refresh=70`` in stage 2) at the
ImageNet recipe from step costs measured here, ResNet-50 at 224 px at a small
batch: the cost of an image in each step as a multiple of a SimCLR two-view
image's (the project's SimCLR step, same device, same round), for stage 2 plain
/ + transforms / + shadow / + both (``fit`` on an in-memory batch, as above) and
stage 1 plain / + transforms (``generate_deltas``, several secrets in one pass
as ``awenc watermark`` makes its candidates). The ``imagenet fraction`` rows
scale them to the ImageNet configs exactly as their header comments do
(pre-training: epochs x the 1,255,544-image split; stage 2 likewise; stage 1:
(J + 1) secrets x steps x batch images) at the measured GPU SimCLR rate
(:data:`GPU_SIMCLR_RATE`); the fraction itself depends on the ratios only. The
shadow's restarts (every ``refresh`` steps, a fresh student built on the
host) are timed apart and added as device-seconds: each of the recipe's 8
processes waits for its own.

Stage 2's specificity term (``awenc demo``'s: ``specific.weight=10
specific.secrets=4 specific.images=16 specific.suppress=1``) is priced apart: its
images per step do not grow with the batch (secrets x 2 x min(images, the
process's batch) + secrets keys, each through f with its gradient and through
f0), so a small measured batch would overstate it. Case (h) runs the term on
the whole measured batch; its extra cost over plain stage 2, per image the term
embeds, is scaled to the ImageNet step's term images per source image
(:func:`specific_images`).
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from benchmarks import project as P
from benchmarks.common import REPO, Context, SuiteWriter, rates, row, short_error, stats, timed
from benchmarks.health import TINY  # the tiny encoder of the recipe rows' test size
from benchmarks.loader import APPETITE as GPU_SIMCLR_RATE  # 2,235 two-view images/s: ResNet-50 SimCLR, one H200 (#29)
from benchmarks.step import cleanup

COLUMNS = [("name", "scenario"), ("settings", "settings"), ("images_per_s", "pretrain img/s (a case row: its own)"),
           ("embed_images_per_s", "embed img/s"), ("watermark_images_per_s", "generation img/s"),
           ("device_hours", "device-hours pretrain / watermark / embed"), ("fraction", "fraction"),
           ("cost_vs_simclr", "cost of an image / a SimCLR image's")]
TABLE_SETTINGS = ["pretrain_epochs", "embed_epochs", "generation_steps", "secrets", "measured_batch", "mode", "recipe"]

SCENARIOS = {
    # name: (pretrain config, watermark config, embed config, dataset size, measured batch: quick / cpu / gpu)
    "digits tiny (demo)": ("configs/pretrain/digits_simclr.yaml", "configs/watermark/digits.yaml", "configs/embed/digits.yaml",
                           1797, (128, 128, 128)),
    "cifar10 resnet18": ("configs/pretrain/cifar10_resnet18_simclr.yaml", "configs/watermark/cifar10.yaml",
                         "configs/embed/cifar10.yaml", 50_000, (None, 16, 512)),
    "imagenet resnet50": ("configs/pretrain/imagenet_resnet50_simclr.yaml", "configs/watermark/imagenet.yaml",
                          "configs/embed/imagenet.yaml", 1_281_167, (None, None, 128)),
}


SCENARIO_IDS = {"digits": "digits tiny (demo)", "cifar10": "cifar10 resnet18", "imagenet": "imagenet resnet50"}
CHOICES = (*SCENARIO_IDS, "recipe")  # --scenarios (default: all, the recipe rows last)


def run(ctx: Context, args) -> Path:
    out = SuiteWriter("cost", ctx, COLUMNS, TABLE_SETTINGS)
    chosen = getattr(args, "scenarios", None) or CHOICES
    with tempfile.TemporaryDirectory(prefix="awenc_bench_cost_") as tmp:
        # most important first: on a GPU the ImageNet ResNet-50 scenario (it is measured there only)
        names = [SCENARIO_IDS[k] for k in SCENARIO_IDS if k in chosen]
        for name in (reversed(names) if ctx.on_gpu else names):
            pre, wm, emb, n, batches = SCENARIOS[name]
            batch = batches[0] if ctx.quick else batches[2] if ctx.on_gpu else batches[1]
            settings = {"pretrain_config": pre, "dataset_size": n}
            if batch is None:
                why = "with --quick" if ctx.quick else "on a CPU (ResNet-50 rates come from a GPU run: benchmarks/gpu_checks.sh)"
                out.add(row(name, settings, status="skipped", note=f"not measured {why}"))
                continue
            if not (REPO / pre).exists():
                out.add(row(name, settings, status="skipped", note=f"{pre} does not exist in this checkout"))
                continue
            if ctx.out_of_time():
                out.add(row(name, settings, status="skipped", note="suite time budget (--max-seconds) used up"))
                continue
            try:
                out.add(scenario(ctx, name, pre, wm, emb, n, batch, Path(tmp), args))
            except Exception as e:  # noqa: BLE001
                out.add(row(name, settings, status="failed", note=short_error(e)))
            finally:
                cleanup(ctx)
        if "recipe" in chosen:
            size = recipe_size(ctx, args)
            name = f"{RESNET50.label}: the recipe's step costs (#27)"
            if size is None:
                out.add(row(name, {"recipe": recipe_text(CASES["embed_recipe"][1])}, status="skipped",
                            note="not measured with --quick (ResNet-50 at 224 px takes minutes); "
                                 "tests/test_benchmarks.py::test_recipe_cost_rows runs these rows at tiny size"))
            elif ctx.out_of_time():
                out.add(row(name, {}, status="skipped", note="suite time budget (--max-seconds) used up"))
            else:
                recipe_rows(ctx, out, size, args.reps or (1 if ctx.quick else 3), Path(tmp))
    return out.json_path


def _load(schema, path: str, overrides: list[str] = ()):
    from dist_awenc.config import load_config

    p = REPO / path
    return load_config(schema, p if p.exists() else None, list(overrides)), (path if p.exists() else "defaults")


def scenario(ctx: Context, name: str, pre: str, wm: str, emb: str, n: int, batch: int, tmp: Path, args) -> dict:
    from dist_awenc.config import EmbedConfig, PretrainConfig, WatermarkConfig
    from dist_awenc.data import make_splits
    from dist_awenc.ssl.pretrain import TrainPlan

    mode = "fp32" if not ctx.on_gpu else "bf16_cl"
    n_split = len(make_splits(n, 0)["pretrain"])
    pcfg, _ = _load(PretrainConfig, pre)
    wcfg, wsrc = _load(WatermarkConfig, wm)
    ecfg, esrc = _load(EmbedConfig, emb)
    pre_plan, emb_plan = TrainPlan.of(pcfg.train, n_split), TrainPlan.of(ecfg.train, n_split)
    pre_images = pre_plan.total_steps * pcfg.train.batch_size
    emb_images = emb_plan.total_steps * ecfg.train.batch_size
    gen_images = wcfg.generation.steps * wcfg.generation.batch_size
    # the three rates are measured in turn, one block each per round, so a change of machine load hits all three
    proto = dict(warmup=3, steps=5, reps=1) if ctx.on_gpu else dict(warmup=1, steps=1 if ctx.quick else 2, reps=1)
    rounds = args.reps or (2 if ctx.quick else 3)
    secs_of: dict[str, list[float]] = {"pretrain": [], "embed": [], "watermark": []}
    for _ in range(rounds):
        secs_of["pretrain"] += project_secs(ctx, pre, "pretrain", batch, mode, proto, tmp)
        secs_of["embed"] += project_secs(ctx, pre, "embed", batch, mode, proto, tmp)
        secs_of["watermark"] += generation_secs(ctx, pre, batch, mode, wcfg.generation, proto, tmp)
        cleanup(ctx)
    pre_rate, emb_rate, gen_rate = (rates(secs_of[k], batch * proto["steps"]) for k in ("pretrain", "embed", "watermark"))
    secs = {"pretrain": pre_images / pre_rate["median"], "watermark": gen_images / gen_rate["median"],
            "embed": emb_images / emb_rate["median"]}
    fraction = (secs["watermark"] + secs["embed"]) / secs["pretrain"]
    settings = {"pretrain_config": pre, "watermark_config": wsrc, "embed_config": esrc, "dataset_size": n,
                "pretrain_split": n_split, "pretrain_epochs": pcfg.train.epochs, "pretrain_batch": pcfg.train.batch_size,
                "pretrain_steps": pre_plan.total_steps, "embed_epochs": ecfg.train.epochs, "embed_batch": ecfg.train.batch_size,
                "embed_steps": emb_plan.total_steps, "generation_steps": wcfg.generation.steps,
                "generation_batch": wcfg.generation.batch_size, "measured_batch": batch, "mode": mode, "rounds": rounds,
                "threads": torch.get_num_threads()}
    hours = " / ".join(f"{secs[k] / 3600:,.3g}" for k in ("pretrain", "watermark", "embed"))
    return row(name, settings, images_per_s=pre_rate, embed_images_per_s=emb_rate, watermark_images_per_s=gen_rate,
               device_seconds=secs, device_hours=hours, fraction=fraction)


def _config(pre: str, batch: int, mode: str, tmp: Path, extra: tuple[str, ...] = ()):
    from dist_awenc.config import PretrainConfig, load_config

    over = [f"train.batch_size={batch}", "train.progress=false", f"run.out_dir={tmp}", *P.speed_overrides(mode), *extra]
    return load_config(PretrainConfig, REPO / pre, over)


def project_secs(ctx: Context, pre: str, stage: str, batch: int, mode: str, proto: dict, tmp: Path) -> list[float]:
    """Seconds per block of the project's pre-training (or embedding) step through ``fit`` on an in-memory batch."""
    cfg = _config(pre, batch, mode, tmp)
    total = proto["warmup"] + proto["reps"] * proto["steps"]
    P.reset_accelerate()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{Path(pre).stem}_{stage}_", dir=tmp))
    accelerator = P.make_project_accelerator(cfg, run_dir, False)
    case = P.project_case(cfg, "embed" if stage == "embed" else cfg.ssl.method, total, accelerator)
    images = P.fixed_images(case, batch, ctx.device)
    return P.run_fit(ctx, case, accelerator, images, run_dir, warmup=proto["warmup"], steps=proto["steps"], reps=proto["reps"])


def generation_secs(ctx: Context, pre: str, batch: int, mode: str, gen, proto: dict, tmp: Path) -> list[float]:
    """Seconds per block of stage 1 (``generate_delta``: f0(x) without gradient, f0(x + delta) forward and backward to delta)."""
    from dist_awenc.ssl.pretrain import encoder_from_config
    from dist_awenc.watermark.perturbation import generate_delta

    cfg = _config(pre, batch, mode, tmp)
    s = cfg.data.image_size
    torch.manual_seed(0)
    encoder, _, _ = encoder_from_config(cfg.encoder, s)
    encoder.to(ctx.device)
    images = torch.rand(batch, 3, s, s, device=ctx.device)
    key = torch.rand(3, s, s, device=ctx.device)

    def go(steps: int) -> None:
        generate_delta(encoder, images, key, eps=gen.eps, alpha=gen.alpha, steps=steps, step_size=gen.step_size,
                       batch_size=batch, optimizer=gen.optimizer, progress=False)

    go(proto["warmup"])
    return [timed(ctx, lambda: go(proto["steps"])) for _ in range(proto["reps"])]


# ----------------------------------------------------------------- the recipe's extra cost at ImageNet (#27 item 4)

GPU_SIMCLR_RATE_SOURCE = ("issue #29: the project's ResNet-50 SimCLR step at 224 px, bf16 + channels_last, one H200 "
                          "(the ImageNet configs' header comments scale from it)")
TARGET = 0.25  # METHOD.md / issue #27: protection costs at most this fraction of the pre-training
IMAGENET = {"pretrain": "configs/pretrain/imagenet_resnet50_simclr.yaml", "watermark": "configs/watermark/imagenet.yaml",
            "embed": "configs/embed/imagenet.yaml", "accelerate": "configs/accelerate/8gpu.yaml", "dataset_size": 1_281_167}
RECIPE_TRANSFORMS = ("robust.transforms=[jpeg,resize,crop,noise,blur]", "robust.p_identity=0.5")
RECIPE_SHADOW = ("shadow.weight=1", "shadow.refresh=70")
# the ImageNet stage-2 config carries the specificity term (awenc demo's recipe); every case starts from it switched
# off, so a case's overrides alone say what it adds to plain AWEncoder
PLAIN_STAGE2 = ("specific.weight=0",)
RECIPE_SPECIFIC = ("specific.weight=10", "specific.secrets=4", "specific.images=16", "specific.suppress=1")  # awenc demo's
CASES = {  # id: (label, stage, overrides of the stage's ImageNet config), measured in this order every round
    "simclr": ("(a) SimCLR step (the reference)", "pretrain", ()),
    "embed": ("(b) stage 2 step, plain", "embed", ()),
    "embed_transforms": ("(c) stage 2 step + transforms", "embed", RECIPE_TRANSFORMS),
    "embed_shadow": ("(d) stage 2 step + shadow", "embed", RECIPE_SHADOW),
    "embed_recipe": ("(e) stage 2 step + transforms + shadow", "embed", RECIPE_TRANSFORMS + RECIPE_SHADOW),
    "stage1": ("(f) stage 1 step, plain", "watermark", ()),
    "stage1_transforms": ("(g) stage 1 step + transforms", "watermark", RECIPE_TRANSFORMS),
    "embed_specific": ("(h) stage 2 step + specificity (its term on every image of the batch)", "embed", RECIPE_SPECIFIC),
}
WITHOUT_SHADOW = {"embed_shadow": "embed", "embed_recipe": "embed_transforms"}
VARIANTS = {  # the imagenet fraction rows: (stage-1 case, stage-2 case)
    "plain": ("stage1", "embed"),
    "+ transforms": ("stage1_transforms", "embed_transforms"),
    "+ shadow": ("stage1", "embed_shadow"),
    "recipe (transforms + shadow)": ("stage1_transforms", "embed_recipe"),
    "+ specificity (awenc demo's stage 2)": ("stage1", "embed_specific"),
}


@dataclass(frozen=True)
class RecipeSize:
    """What the recipe rows measure at: the encoder (the ImageNet configs' ResNet-50, or overrides), the batch, the
    timing protocol."""

    label: str
    batch: int  # source images a SimCLR / stage-2 step; stage 1: images a secret per step
    mode: str  # precision mode of the fit steps (project.MODES); stage 1 runs as `awenc watermark` does (fp32)
    warmup: int  # untimed steps before each block (every block builds its case afresh)
    steps: int  # timed fit steps a block
    gen_steps: int  # timed stage-1 steps a block
    secrets: int = 2  # stage 1's secrets in one pass (the ImageNet run: 16), each `batch` images a step
    pretrain_overrides: tuple[str, ...] = ()  # of the ImageNet pre-training config (f0's encoder)
    stage_overrides: tuple[str, ...] = ()  # of the ImageNet embed and watermark configs


RESNET50 = RecipeSize("resnet50 224 px", batch=2, mode="fp32", warmup=1, steps=1, gen_steps=4)  # stage 1: f0(keys) once a block
TINY_RECIPE = RecipeSize("tiny_resnet 32 px (test size: the numbers mean nothing)", batch=2, mode="fp32", warmup=1,
                         steps=1, gen_steps=1, pretrain_overrides=tuple(TINY), stage_overrides=("data.image_size=32",))


def recipe_size(ctx: Context, args) -> Optional[RecipeSize]:
    """The size of the recipe rows on this device (None with --quick); ``--batch``, ``--steps``, ``--warmup`` override."""
    if ctx.quick:
        return None
    size = replace(RESNET50, batch=32, mode="bf16_cl", warmup=2, steps=3, gen_steps=3) if ctx.on_gpu else RESNET50
    for k in ("batch", "steps", "warmup"):
        if getattr(args, k, None):
            size = replace(size, **{k: getattr(args, k)}, **({"gen_steps": args.steps} if k == "steps" else {}))
    return size


def recipe_text(overrides) -> str:
    return " ".join(overrides) or "plain"


def recipe_rows(ctx: Context, out: SuiteWriter, size: RecipeSize, rounds: int, tmp: Path) -> None:
    """Rows (a)-(h) (``kind: aux``: each case's images/s and its cost of an image as a multiple of a SimCLR image's)
    and the five ``imagenet fraction`` rows; rounds of one block of every case, so a change of load hits all.

    The rows are rewritten after every round (a run cut off keeps the rounds it finished); a round is not started
    once the suite's budget (--max-seconds) is used up.
    """
    secs: dict[str, list[Optional[float]]] = {c: [] for c in CASES}  # per round: seconds an image (None: not measured)
    restart: dict[str, list[float]] = {c: [] for c in CASES}
    problem: dict[str, tuple[str, str]] = {}
    start = len(out.rows)
    done = 0
    for r in range(rounds):
        if r and ctx.out_of_time():
            break
        for c in CASES:
            if c in problem or (r and ctx.out_of_time()):
                secs[c].append(None)
                continue
            if ctx.out_of_time():
                problem[c] = ("skipped", "suite time budget (--max-seconds) used up")
                secs[c].append(None)
                continue
            try:
                s, n, rs = case_block(ctx, c, size, tmp)
                secs[c].append(s / n)
                if rs is not None:
                    restart[c].append(rs)
            except Exception as e:  # noqa: BLE001  (one case failing must not lose the others)
                problem[c] = ("failed", short_error(e))
                secs[c].append(None)
            finally:
                cleanup(ctx)
        done += 1
        del out.rows[start:]
        out.rows.extend(recipe_table(ctx, size, secs, restart, problem, done))
        out.write()
        print(f"[cost] recipe round {done}/{rounds} done", file=sys.stderr, flush=True)
    rows = recipe_table(ctx, size, secs, restart, problem, done)
    del out.rows[start:]
    for r_ in rows:
        out.add(r_)


def case_block(ctx: Context, case: str, size: RecipeSize, tmp: Path) -> tuple[float, int, Optional[float]]:
    """One block of a case, built afresh: (seconds, images in them, seconds of one shadow restart or None)."""
    _, stage, over = CASES[case]
    if stage == "watermark":
        return stage1_block(ctx, size, over, tmp)
    P.reset_accelerate()
    run_dir = Path(tempfile.mkdtemp(prefix=f"recipe_{case}_", dir=tmp))
    built, accelerator = build_case(case, size, size.warmup + size.steps, run_dir, tmp)
    images = P.fixed_images(built, size.batch, ctx.device)
    (seconds,) = P.run_fit(ctx, built, accelerator, images, run_dir, warmup=size.warmup, steps=size.steps, reps=1)
    shadow = getattr(built.model, "shadow", None)
    restart = timed(ctx, lambda: shadow.restart(1)) if shadow is not None else None  # EmbedTask.after_step's restart
    return seconds, size.batch * size.steps, restart


def build_case(case: str, size: RecipeSize, total_steps: int, run_dir: Path, tmp: Path):
    """A SimCLR or stage-2 case as ``awenc pretrain`` / ``awenc embed`` build it from the ImageNet configs (with
    the case's overrides and ``size``'s): (project.ProjectCase, its Accelerator)."""
    from dist_awenc.config import EmbedConfig

    _, stage, over = CASES[case]
    pcfg = _config(IMAGENET["pretrain"], size.batch, size.mode, tmp, size.pretrain_overrides)
    ecfg = None
    if stage == "embed":
        whole_batch = [f"specific.images={size.batch}"] if case == "embed_specific" else []
        ecfg, _ = _load(EmbedConfig, IMAGENET["embed"], [*PLAIN_STAGE2, f"train.batch_size={size.batch}",
                                                         "train.progress=false", f"run.out_dir={tmp}",
                                                         *P.speed_overrides(size.mode), *size.stage_overrides, *over,
                                                         *whole_batch])
    accelerator = P.make_project_accelerator(ecfg or pcfg, run_dir, False)
    built = P.project_case(pcfg, "embed" if ecfg else pcfg.ssl.method, total_steps, accelerator, embed_cfg=ecfg)
    return built, accelerator


def stage1_block(ctx: Context, size: RecipeSize, over: tuple[str, ...], tmp: Path) -> tuple[float, int, None]:
    """``generate_deltas`` (what ``awenc watermark`` runs for its candidates: ``size.secrets`` secrets in one pass,
    the ImageNet config's generation section and ``over``'s transforms) on images already on the device."""
    from dist_awenc.config import WatermarkConfig
    from dist_awenc.ssl.pretrain import encoder_from_config
    from dist_awenc.watermark.perturbation import generate_deltas
    from dist_awenc.watermark.transforms import make_transform

    pcfg = _config(IMAGENET["pretrain"], size.batch, "fp32", tmp, size.pretrain_overrides)
    wcfg, _ = _load(WatermarkConfig, IMAGENET["watermark"], [*size.stage_overrides, *over])
    g, s, k, b = wcfg.generation, pcfg.data.image_size, size.secrets, size.batch
    torch.manual_seed(0)
    encoder, _, _ = encoder_from_config(pcfg.encoder, s)
    encoder.to(ctx.device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(k * b, 3, s, s, generator=gen).to(ctx.device)
    keys = torch.rand(k, 3, s, s, generator=gen).to(ctx.device)
    transform = make_transform(wcfg.robust)

    def go(steps: int) -> None:
        generate_deltas(encoder, images, keys, list(range(k)), eps=g.eps, alpha=g.alpha, steps=steps,
                        step_size=g.step_size, batch_size=b, optimizer=g.optimizer, progress=False, transform=transform)

    go(size.warmup)
    return timed(ctx, lambda: go(size.gen_steps)), k * b * size.gen_steps, None


def recipe_table(ctx: Context, size: RecipeSize, secs: dict, restart: dict, problem: dict, rounds: int) -> list[dict]:
    """The case rows and the imagenet fraction rows from what is measured so far."""
    rows, ratios = [], {}
    ref = secs["simclr"]
    for c, (label, stage, over) in CASES.items():
        settings = {"case": c, "stage": stage, "recipe": recipe_text(over), "measured_batch": size.batch,
                    "mode": "fp32" if stage == "watermark" else size.mode, "rounds": rounds,
                    "threads": torch.get_num_threads(), "config": IMAGENET[stage], "config_overrides": list(over)}
        if stage == "watermark":
            settings.update(secrets=size.secrets, images_per_step=size.secrets * size.batch, steps_per_block=size.gen_steps,
                            made_by="generate_deltas: the secrets' clean and marked images in one pass")
        else:
            settings.update(steps_per_block=size.steps, made_by="fit on an in-memory batch (views made in the step)")
        settings.update(warmup_steps=size.warmup, encoder_overrides=list(size.pretrain_overrides) or None)
        per = [v for v in secs[c] if v is not None]
        name = f"{size.label}: {label}"
        status, note = problem.get(c, ("ok", ""))
        if not per:
            rows.append(row(name, settings, kind="aux", status=status if status != "ok" else "skipped",
                            note=note or "not measured yet"))
            continue
        paired = [x / a for x, a in zip(secs[c], ref) if x is not None and a is not None]
        ratios[c] = stats(paired)
        fields = {"images_per_s": stats(1 / v for v in per), "seconds_per_image": stats(per), "cost_vs_simclr": ratios[c]}
        if restart[c]:
            fields["restart_seconds"] = stats(restart[c])
        if ratios[c] is None:
            note = (note + "; " if note else "") + "no round measured the SimCLR reference: no ratio"
        rows.append(row(name, settings, kind="aux", note=(f"{status} in a later round: " if note and status != "ok"
                                                           else "") + note, **fields))
    restarts = restart["embed_shadow"] + restart["embed_recipe"]  # a restart is the same with or without transforms
    for variant, (c1, c2) in VARIANTS.items():
        rows.append(fraction_row(ctx, size, variant, c1, c2, ratios, stats(restarts), rounds))
    return rows


def fraction_row(ctx: Context, size: RecipeSize, variant: str, c1: str, c2: str, ratios: dict,
                 restart: Optional[dict], rounds: int) -> dict:
    """One ``imagenet fraction`` row: the measured cost ratios of its two cases scaled to the ImageNet configs."""
    over = tuple(dict.fromkeys(CASES[c1][2] + CASES[c2][2]))
    name = f"imagenet fraction (estimate from {ctx.device.type.upper()} ratios x measured GPU SimCLR rate): {variant}"
    inp = imagenet_inputs(CASES[c2][2])
    settings = {"variant": variant, "recipe": recipe_text(over), "stage1_case": c1, "stage2_case": c2, **inp,
                "gpu_simclr_rate": GPU_SIMCLR_RATE, "gpu_simclr_rate_source": GPU_SIMCLR_RATE_SOURCE,
                "measured_on": ctx.device.type, "measured_size": size.label, "measured_batch": size.batch,
                "mode": size.mode, "rounds": rounds, "target": TARGET,
                "configs": {k: IMAGENET[k] for k in ("pretrain", "watermark", "embed", "accelerate")}}
    missing = [CASES[c][0] for c in ("simclr", c1, c2) if not ratios.get(c)]
    if missing:
        return row(name, settings, status="skipped", note="needs " + ", ".join(missing) + ", not measured")
    if inp["shadow_restarts"] and not restart:
        return row(name, settings, status="skipped", note="needs the shadow's restart seconds, not measured")
    r1, r2 = ratios[c1], ratios[c2]
    fields = {}
    if c2 == "embed_specific":
        if not ratios.get("embed"):
            return row(name, settings, status="skipped", note=f"needs {CASES['embed'][0]}, not measured")
        fields["term_images_to_meet_target"] = specific_budget(inp, r1["median"], ratios["embed"]["median"],
                                                               ratios[c2]["median"], size.batch)
        r2 = scaled_specific(ratios["embed"], r2, size.batch, inp)
        settings.update(specific_images_per_source_image={"measured": measured_share(inp, size.batch),
                                                          "imagenet": inp["specific_images_per_source_image"]})
    rs = restart["median"] if inp["shadow_restarts"] else 0.0
    est = imagenet_estimate(r1["median"], r2["median"], inp, restart_seconds=rs)
    low = imagenet_estimate(r1["min"], r2["min"], inp, restart_seconds=restart["min"] if inp["shadow_restarts"] else 0.0)
    high = imagenet_estimate(r1["max"], r2["max"], inp, restart_seconds=restart["max"] if inp["shadow_restarts"] else 0.0)
    settings.update(stage1_cost_vs_simclr=r1["median"], stage2_cost_vs_simclr=r2["median"],
                    restart_seconds=rs if inp["shadow_restarts"] else None)
    inverse = lambda s: {"median": GPU_SIMCLR_RATE / s["median"], "min": GPU_SIMCLR_RATE / s["max"],  # noqa: E731
                         "max": GPU_SIMCLR_RATE / s["min"], "n": s["n"]}
    f = est["fraction"]
    meets = f <= TARGET
    note = (f"{100 * f:.1f}% of a {inp['pretrain_epochs']}-epoch pre-training ({100 * low['fraction']:.1f}-"
            f"{100 * high['fraction']:.1f}% over the rounds' ratios): {'within' if meets else 'over'} the "
            f"{100 * TARGET:.0f}% target")
    if c2 == "embed_specific" and not meets:
        most = fields["term_images_to_meet_target"] * (inp["embed_batch"] // inp["processes"])
        note += (f"; under it with at most {most:.0f} term images a step of one process (secrets x (2 x images + 1): "
                 f"{inp['specific_secrets'] * (2 * inp['specific_images'] + 1)} now, e.g. "
                 + ", ".join(f"secrets={k} images={(most / k - 1) // 2:.0f}" for k in (4, 8) if most / k >= 3) + ")")
    if c2 in WITHOUT_SHADOW:
        without = ratios.get(WITHOUT_SHADOW[c2])
        need = to_meet_target(inp, r1["median"], r2["median"], without["median"] if without else None, rs)
        fields["to_meet_target"] = need
        if not meets:
            q, e, s = need["shadow_share_of_batch"], need["embed_epochs"], need["generation_steps"]
            ways = []
            if q is not None:
                ways.append(f"the shadow on {100 * q:.0f}% of each batch (if its cost scales with the images it sees)"
                            if q > 0 else "no shadow at all is not enough")
            ways.append(f"{e:.2f} embedding epochs (not {inp['embed_epochs']})" if e > 0 else "no embedding epochs")
            ways.append(f"{s:.0f} stage-1 steps (not {inp['generation_steps']})" if s > 0 else "no stage 1")
            note += "; under it with: " + ", or ".join(ways)
            if inp["shadow_restarts"]:
                note += (f" (the shadow's {inp['shadow_restarts']} restarts x {inp['processes']} processes are "
                         f"{100 * need['restart_share']:.1f} points)")
    hours = " / ".join(f"{est['device_seconds'][k] / 3600:,.3g}" for k in ("pretrain", "watermark", "embed"))
    rate = GPU_SIMCLR_RATE
    return row(name, settings, note=note, images_per_s={"median": rate, "min": rate, "max": rate, "n": 1},
               embed_images_per_s=inverse(r2), watermark_images_per_s=inverse(r1), device_seconds=est["device_seconds"],
               device_hours=hours, fraction=f, fraction_range=[low["fraction"], high["fraction"]],
               restart_device_seconds=est["restart_device_seconds"], images=est["images"], meets_target=meets, **fields)


def specific_images(secrets: int, images: int, batch: int) -> int:
    """Images the specificity term embeds in one step of one process: each of the ``secrets`` drawn alternatives'
    marked and control copies of the first min(``images``, batch) clean images, and its key."""
    return secrets * (2 * min(images, batch) + 1)


def measured_share(inp: dict, batch: int) -> float:
    """Case (h)'s term images per source image: the term on every one of the measured ``batch`` images."""
    return specific_images(inp["specific_secrets"], batch, batch) / batch


def scaled_specific(plain: dict, measured: dict, batch: int, inp: dict) -> dict:
    """Case (h)'s cost of a source image (stats over rounds) rescaled from the measured batch's term images per source
    image to the ImageNet step's: plain + (measured - plain) x (ImageNet's share / the measured share)."""
    scale = inp["specific_images_per_source_image"] / measured_share(inp, batch)
    return {k: (plain[k] + (measured[k] - plain[k]) * scale if k in ("median", "min", "max") else measured[k])
            for k in measured}


def specific_budget(inp: dict, stage1_cost: float, plain: float, measured: float, batch: int,
                    target: float = TARGET, rate: float = GPU_SIMCLR_RATE) -> float:
    """The most specificity-term images per source image of stage 2 that keep the fraction at ``target``, from the
    term's measured cost per term image ((measured - plain) / the measured term images per source image)."""
    per_term_image = (measured - plain) / measured_share(inp, batch)
    est = imagenet_estimate(stage1_cost, plain, inp, rate=rate)
    spare = target * est["device_seconds"]["pretrain"] - est["device_seconds"]["watermark"] - est["device_seconds"]["embed"]
    return spare * rate / est["images"]["embed"] / per_term_image


def imagenet_inputs(embed_overrides: tuple[str, ...] = ()) -> dict:
    """What the ImageNet configs say of the three stages' sizes (``embed_overrides``: the variant's stage-2 options)."""
    from omegaconf import OmegaConf

    from dist_awenc.config import EmbedConfig, PretrainConfig, WatermarkConfig
    from dist_awenc.data import make_splits
    from dist_awenc.ssl.pretrain import TrainPlan

    pcfg, _ = _load(PretrainConfig, IMAGENET["pretrain"])
    wcfg, _ = _load(WatermarkConfig, IMAGENET["watermark"])
    ecfg, _ = _load(EmbedConfig, IMAGENET["embed"], [*PLAIN_STAGE2, *embed_overrides])
    n = IMAGENET["dataset_size"]
    split = len(make_splits(n, pcfg.data.split_seed, pcfg.data.splits)["pretrain"])
    embed_split = len(make_splits(n, ecfg.data.split_seed, ecfg.data.splits)["pretrain"])
    world = int(OmegaConf.load(REPO / IMAGENET["accelerate"]).num_processes)
    steps = TrainPlan.of(ecfg.train, embed_split, processes=world).total_steps
    refresh = ecfg.shadow.refresh if ecfg.shadow.weight > 0 else 0
    per_process = ecfg.train.batch_size // world  # the ImageNet step's source images on one process
    return {"dataset_size": n, "pretrain_split": split, "embed_split": embed_split,
            "pretrain_epochs": pcfg.train.epochs, "embed_epochs": ecfg.train.epochs, "embed_batch": ecfg.train.batch_size,
            "embed_steps": steps, "processes": world, "secrets": wcfg.plan.alternatives + 1,
            "generation_steps": wcfg.generation.steps, "generation_batch": wcfg.generation.batch_size,
            "shadow_refresh": refresh, "shadow_restarts": (steps - 1) // refresh if refresh else 0,
            "specific_secrets": ecfg.specific.secrets, "specific_images": ecfg.specific.images,
            "specific_images_per_source_image": (specific_images(ecfg.specific.secrets, ecfg.specific.images, per_process)
                                                 / per_process if ecfg.specific.weight > 0 else 0.0)}


def imagenet_estimate(stage1_cost: float, stage2_cost: float, inp: dict, *, restart_seconds: float = 0.0,
                      rate: float = GPU_SIMCLR_RATE) -> dict:
    """Device-seconds of the three stages at ImageNet, as the configs' header comments compute them.

    ``stage1_cost`` / ``stage2_cost``: an image of that stage's step as a multiple of a SimCLR two-view image;
    pre-training runs at ``rate`` two-view images/s. Images: pre-training and stage 2 their epochs x their split;
    stage 1 (J + 1) secrets x steps x batch. The shadow's restarts (``restart_seconds`` each, on every one of the
    ``processes``) add to stage 2.
    """
    images = {"pretrain": inp["pretrain_epochs"] * inp["pretrain_split"],
              "watermark": inp["secrets"] * inp["generation_steps"] * inp["generation_batch"],
              "embed": inp["embed_epochs"] * inp["embed_split"]}
    restarts = inp["shadow_restarts"] * inp["processes"] * restart_seconds
    secs = {"pretrain": images["pretrain"] / rate, "watermark": images["watermark"] * stage1_cost / rate,
            "embed": images["embed"] * stage2_cost / rate + restarts}
    return {"images": images, "device_seconds": secs, "restart_device_seconds": restarts,
            "fraction": (secs["watermark"] + secs["embed"]) / secs["pretrain"]}


def to_meet_target(inp: dict, stage1_cost: float, stage2_cost: float, stage2_without_shadow: Optional[float],
                   restart_seconds: float, target: float = TARGET, rate: float = GPU_SIMCLR_RATE) -> dict:
    """One knob at a time, the value that brings the fraction to ``target`` (the recipe itself is not changed).

    ``shadow_share_of_batch``: the share of each batch the shadow terms would see, if their cost scaled with it
    (their per-step part, the student's weight gradients flattened and its optimiser update, would not: an
    optimistic figure); None without a stage-2 cost without the shadow; <= 0: not enough even without it.
    ``embed_epochs`` (restarts scale with them), ``generation_steps`` (at the same J): the most that fit.
    """
    est = imagenet_estimate(stage1_cost, stage2_cost, inp, restart_seconds=restart_seconds, rate=rate)
    secs, rs = est["device_seconds"], est["restart_device_seconds"]
    budget = target * secs["pretrain"]
    share = None
    if stage2_without_shadow is not None and stage2_cost > stage2_without_shadow:
        shadow_s = est["images"]["embed"] * (stage2_cost - stage2_without_shadow) / rate
        share = (budget - secs["watermark"] - (secs["embed"] - shadow_s)) / shadow_s
    per_step = secs["watermark"] / inp["generation_steps"]
    return {"target": target, "shadow_share_of_batch": share,
            "embed_epochs": (budget - secs["watermark"]) / (secs["embed"] / inp["embed_epochs"]),
            "generation_steps": (budget - secs["embed"]) / per_step,
            "restart_share": rs / secs["pretrain"], "fraction_without_restarts": est["fraction"] - rs / secs["pretrain"]}
