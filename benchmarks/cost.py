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
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks import project as P
from benchmarks.common import REPO, Context, SuiteWriter, rates, row, short_error, timed
from benchmarks.step import cleanup

COLUMNS = [("name", "scenario"), ("settings", "settings"), ("images_per_s", "pretrain img/s"),
           ("embed_images_per_s", "embed img/s"), ("watermark_images_per_s", "generation img/s"),
           ("device_hours", "device-hours pretrain / watermark / embed"), ("fraction", "fraction")]
TABLE_SETTINGS = ["pretrain_epochs", "embed_epochs", "generation_steps", "measured_batch", "mode"]

SCENARIOS = {
    # name: (pretrain config, watermark config, embed config, dataset size, measured batch: quick / cpu / gpu)
    "digits tiny (demo)": ("configs/pretrain/digits_simclr.yaml", "configs/watermark/digits.yaml", "configs/embed/digits.yaml",
                           1797, (128, 128, 128)),
    "cifar10 resnet18": ("configs/pretrain/cifar10_resnet18_simclr.yaml", "configs/watermark/cifar10.yaml",
                         "configs/embed/cifar10.yaml", 50_000, (None, 16, 512)),
    "imagenet resnet50": ("configs/pretrain/imagenet_resnet50_simclr.yaml", "configs/watermark/imagenet.yaml",
                          "configs/embed/imagenet.yaml", 1_281_167, (None, None, 128)),
}


def run(ctx: Context, args) -> Path:
    out = SuiteWriter("cost", ctx, COLUMNS, TABLE_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="awenc_bench_cost_") as tmp:
        # most important first: on a GPU the ImageNet ResNet-50 scenario (it is measured there only)
        for name in (reversed(SCENARIOS) if ctx.on_gpu else SCENARIOS):
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


def _config(pre: str, batch: int, mode: str, tmp: Path):
    from dist_awenc.config import PretrainConfig, load_config

    over = [f"train.batch_size={batch}", "train.progress=false", f"run.out_dir={tmp}", *P.speed_overrides(mode)]
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
