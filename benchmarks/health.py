"""Suite ``health``: what throughput cannot show about the ImageNet SimCLR recipe
(``configs/pretrain/imagenet_resnet50_simclr.yaml``).

* ``memory``: peak GPU memory of the project's step (``fit``, as in the ``step`` suite) at the recipe's per-GPU
  batch (``train.batch_size`` over the processes of ``configs/accelerate/8gpu.yaml``: 4096 / 8 = 512 images, two
  views each, 224 px, bf16 + channels_last): ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``
  against the card's memory; where that batch does not fit, a short search for the largest that does. Not
  measured on a CPU (host memory says nothing about a GPU's).
* ``sync_bn``: SyncBatchNorm under DDP on every visible GPU against one BatchNorm over the global batch
  (:mod:`benchmarks.health_syncbn`); it needs 2 GPUs, and on a CPU it runs (gloo, 2 processes) only where this
  torch's SyncBatchNorm takes CPU tensors.
* ``loss``: the loss falls over a few hundred steps of the recipe's step through the project's ``fit`` (its model,
  LARS at the lr the recipe's scaling rule gives the batch, its warm-up share, its views) on a fixed pool of
  generated images, cut into RandomResizedCrop views anew every epoch by the project's crop boxes: the mean loss
  of the last tenth of the steps must be at most ``1 - LOSS_MARGIN`` times that of the first tenth.

A check that does not hold is a ``failed`` row (``gpu_checks.sh`` exits 1); one that cannot run here is
``skipped`` with the reason.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import project as P
from benchmarks.common import REPO, Context, SuiteWriter, rates, row, short_error
from benchmarks.step import cleanup

RECIPE = "configs/pretrain/imagenet_resnet50_simclr.yaml"
RECIPE_LAUNCH = "configs/accelerate/8gpu.yaml"  # the recipe's node: its num_processes divides the global batch
COLUMNS = [("name", "check"), ("settings", "settings"), ("summary", "result"), ("seconds", "seconds")]
TABLE_SETTINGS = ["model", "image_size", "batch", "steps", "mixed_precision", "channels_last", "ranks", "backend"]
# The loss check passes if the last tenth's mean loss <= (1 - margin) x the first tenth's. At --quick size (tiny ResNet,
# 100 steps, CPU) the recipe's step fell by 13-18% (4 seeds), the same step at lr 1e-12 by 0.5-2.1% (3 seeds: noise);
# a ResNet-18 at 64 px fell by 13% in 100 steps. A GPU run's tenths (batch 128, 30 steps) are far less noisy
LOSS_MARGIN = 0.05
MEMORY_STEPS = dict(warmup=2, steps=2, reps=1)  # the optimiser's state exists from the first step on
BATCH_GRAIN = 32  # the memory search's resolution (images per GPU)
TINY = ["encoder.arch=tiny_resnet", "encoder.stem=null", "encoder.width=8", "encoder.proj_hidden_dim=64",
        "encoder.proj_dim=32", "data.image_size=32"]  # the recipe at CPU size: BatchNorm, its heads, loss, LARS, views


def plan(ctx: Context, args) -> dict:
    """The loss check's sizes: the recipe's ResNet-50 at 224 px on a GPU; a tiny ResNet at 32 px elsewhere."""
    if ctx.on_gpu and not ctx.quick:
        p = dict(model="resnet50_in224", overrides=[], mode="bf16_cl", batch=128, steps=300, pool_batches=8)
    else:
        p = dict(model="tiny_resnet 32 px", overrides=TINY, mode="fp32", batch=32, steps=100 if ctx.quick else 200,
                 pool_batches=4)
    if getattr(args, "steps", None):
        p["steps"] = args.steps
    if getattr(args, "batch", None):
        p["batch"] = args.batch
    if p["steps"] < 10 or p["steps"] % 10:
        raise ValueError(f"health: --steps must be a multiple of 10 (tenths of the run are compared), not {p['steps']}")
    return p


def run(ctx: Context, args) -> Path:
    out = SuiteWriter("health", ctx, COLUMNS, TABLE_SETTINGS)
    checks: list[tuple[str, Callable[[Path], dict]]] = [
        ("memory", lambda tmp: memory_row(ctx, tmp)),
        ("sync_bn", lambda tmp: sync_bn_row(ctx)),
        ("loss", lambda tmp: loss_row(ctx, plan(ctx, args), tmp)),
    ]
    with tempfile.TemporaryDirectory(prefix="awenc_bench_health_") as tmp:
        for check, fn in checks:
            if ctx.out_of_time():
                out.add(row(check, {}, status="skipped", note="suite time budget (--max-seconds) used up", check=check))
                continue
            t = time.perf_counter()
            try:
                r = fn(Path(tmp))
            except Exception as e:  # noqa: BLE001  (one check failing must not lose the others)
                r = row(check, {}, status="failed", note=short_error(e))
            finally:
                cleanup(ctx)
            r.setdefault("check", check)
            r.setdefault("seconds", round(time.perf_counter() - t, 1))
            out.add(r)
    return out.json_path


# ----------------------------------------------------------------- memory


def recipe_per_gpu_batch() -> tuple[int, int, int]:
    """(global batch, processes, per-process batch) of the recipe on its launcher config's node."""
    import yaml

    from dist_awenc.config import PretrainConfig, load_config

    batch = load_config(PretrainConfig, REPO / RECIPE, []).train.batch_size
    n = int(yaml.safe_load((REPO / RECIPE_LAUNCH).read_text())["num_processes"])
    return batch, n, batch // n


def largest_fitting(fits: Callable[[int], bool], start: int, grain: int = BATCH_GRAIN, tries: int = 6) -> Optional[int]:
    """The largest batch ``fits`` accepts, searched from ``start`` down: ``start`` itself, else halvings to the first
    that fits, then bisection to ``grain`` images; at most ``tries`` calls. None if nothing down to ``grain`` fits."""
    if fits(start):
        return start
    calls, hi, lo = 1, start, None
    b = start // 2
    while b >= grain and calls < tries:
        calls += 1
        if fits(b):
            lo = b
            break
        hi, b = b, b // 2
    while lo is not None and hi - lo > grain and calls < tries:
        mid = (lo + hi) // 2 // grain * grain
        if mid <= lo:
            break
        calls += 1
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _gib(n: float) -> float:
    return round(n / 2**30, 2)


def step_memory(ctx: Context, batch: int, tmp: Path) -> dict:
    """Peak memory of the recipe's step at ``batch`` per GPU (one process: no DDP buckets, no NCCL buffers)."""
    cfg, path = P.pretrain_config("resnet50_in224", "simclr", batch=batch, mode="bf16_cl", out_dir=tmp)
    run_dir = Path(tempfile.mkdtemp(prefix=f"memory_{batch}_", dir=tmp))
    P.reset_accelerate()
    accelerator = P.make_project_accelerator(cfg, run_dir, False)
    total = MEMORY_STEPS["warmup"] + MEMORY_STEPS["reps"] * MEMORY_STEPS["steps"]
    case = P.project_case(cfg, "simclr", total, accelerator)
    images = P.fixed_images(case, batch, ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    secs = P.run_fit(ctx, case, accelerator, images, run_dir, **MEMORY_STEPS)
    return {"batch": batch, "max_allocated_gib": _gib(torch.cuda.max_memory_allocated(ctx.device)),
            "max_reserved_gib": _gib(torch.cuda.max_memory_reserved(ctx.device)),
            "images_per_s": rates(secs, batch * MEMORY_STEPS["steps"]), "config": path}


def memory_row(ctx: Context, tmp: Path) -> dict:
    global_batch, n, per_gpu = recipe_per_gpu_batch()
    name = f"peak memory: resnet50 simclr 224 px, recipe batch {per_gpu}/GPU, bf16 + channels_last"
    settings = {"model": "resnet50_in224", "image_size": 224, "batch": per_gpu, "views": 2, "mixed_precision": "bf16",
                "channels_last": True, "config": RECIPE, "global_batch": global_batch, "processes": n,
                "launch_config": RECIPE_LAUNCH}
    if not ctx.on_gpu:
        return row(name, settings, status="skipped", note="not measured on CPU: peak GPU memory needs CUDA "
                   "(torch.cuda.max_memory_allocated); a CPU process's memory says nothing about a GPU's")
    if ctx.quick:
        return row(name, settings, status="skipped", note="not measured with --quick (tiny sizes)")
    card = torch.cuda.get_device_properties(ctx.device).total_memory
    tried: list[dict] = []

    def fits(batch: int) -> bool:
        try:
            tried.append(step_memory(ctx, batch, tmp))
            return True
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # cuDNN and NCCL report theirs as RuntimeError
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            tried.append({"batch": batch, "out_of_memory": True})
            return False
        finally:
            cleanup(ctx)

    best = largest_fitting(fits, per_gpu)
    at = next((t for t in tried if t["batch"] == best and not t.get("out_of_memory")), None)
    settings.update(card_memory_gib=_gib(card), tried=[t["batch"] for t in tried])
    if at is None:
        return row(name, settings, status="failed", note=f"no batch down to {BATCH_GRAIN} fits this card's "
                   f"{_gib(card)} GiB", tried=tried)
    fits_recipe = best == per_gpu
    summary = (f"batch {best}: max allocated {at['max_allocated_gib']} GiB, reserved {at['max_reserved_gib']} GiB of "
               f"{_gib(card)} GiB ({100 * at['max_reserved_gib'] / _gib(card):.0f}%)")
    if not fits_recipe:
        summary = f"the recipe's {per_gpu}/GPU does not fit; largest found: {summary}"
    return row(name, settings, images_per_s=at["images_per_s"], summary=summary, fits_recipe_batch=fits_recipe,
               largest_batch=best, max_allocated_gib=at["max_allocated_gib"], max_reserved_gib=at["max_reserved_gib"],
               card_memory_gib=_gib(card), tried=tried,
               note="one process: DDP's gradient buckets (~0.1 GiB for ResNet-50), NCCL's buffers and the CUDA "
                    "context come on top of reserved")


# ----------------------------------------------------------------- SyncBN


def sync_bn_row(ctx: Context) -> dict:
    from benchmarks import health_syncbn as S

    ranks = torch.cuda.device_count() if ctx.on_gpu else 2
    name = f"SyncBN under DDP, {ranks} ranks, against one BatchNorm over the global batch"
    settings = {"ranks": ranks, "backend": "nccl" if ctx.on_gpu else "gloo", "tolerance": S.TOL, "iterations": S.ITERS,
                "shard": [S.SHARD, S.CHANNELS, S.SIDE, S.SIDE], "dtype": "float32 (TF32 off)"}
    if ctx.on_gpu and ranks < 2:
        return row(name, settings, status="skipped", note=f"needs 2 GPUs ({ranks} visible)")
    if not ctx.on_gpu:
        reason = S.cpu_support()
        if reason:
            return row(name, settings, status="skipped", note=f"torch {torch.__version__}'s SyncBatchNorm does not run on "
                       f"CPU tensors ({reason}): checked on 2 or more GPUs only")
    result = S.run_check(ranks, ctx.device.type)
    for key, status in (("unsupported", "skipped"), ("error", "failed")):
        if key in result:
            return row(name, settings, status=status, note=result[key])
    ok, summary = S.verdict(result["errors"])
    return row(name, settings, status="ok" if ok else "failed", note="" if ok else f"SyncBN disagrees: {summary}",
               summary=summary, errors=result["errors"])


# ----------------------------------------------------------------- loss


class PoolSource:
    """A BatchSource over a fixed pool of images on the device (uint8, (N, 3, H, W)), ``views.crop=decode`` style:
    each epoch cuts every image's views anew with the project's crop boxes (``crop_boxes`` of the epoch's key, as
    the loaders do), resized on the device (``roi_align``, bilinear). Yields (b, V, 3, S, S) floats in [0, 1]."""

    def __init__(self, pool: torch.Tensor, batch: int, spec) -> None:
        self.pool, self.batch, self.spec = pool, batch, spec
        self.batches = len(pool) // batch

    def views(self, epoch: int, k: int) -> torch.Tensor:
        import numpy as np
        from torchvision.ops import roi_align

        from dist_awenc.data.crops import crop_boxes, crop_uniforms

        b, v, s = self.batch, self.spec.n_views, self.spec.size
        pos = np.arange(k * b, (k + 1) * b)
        h, w = self.pool.shape[-2:]
        box = crop_boxes(crop_uniforms(self.spec.key(epoch), pos, v), np.full(b, h), np.full(b, w), self.spec.scale,
                         self.spec.ratio)  # (b, V, 4): top, left, height, width
        box = torch.from_numpy(box).to(self.pool.device, torch.float32).reshape(b * v, 4)
        rois = torch.stack([torch.arange(b * v, device=box.device).div(v, rounding_mode="floor").float(), box[:, 1],
                            box[:, 0], box[:, 1] + box[:, 3], box[:, 0] + box[:, 2]], dim=1)
        x = self.pool[k * b:(k + 1) * b].float().div_(255)
        return roi_align(x, rois, output_size=s, spatial_scale=1.0, sampling_ratio=2, aligned=True).view(b, v, 3, s, s)

    def iterate(self, epoch: int, start: int):
        k = start
        while True:
            if k == self.batches:
                epoch, k = epoch + 1, 0
            x = self.views(epoch, k)
            idx = torch.arange(k * self.batch, (k + 1) * self.batch, device=x.device)
            yield x, torch.zeros_like(idx), idx
            k += 1


def make_pool(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n`` generated images, uint8 (n, 3, 1.25 S, 1.5 S), made on the device in chunks: each a texture of its own
    (three sine gratings of random orientation, 2 to 8 cycles per image height, and phase) between two random
    colours, over a smooth random colour field, with mild noise. Every crop of an image shows its texture, so two
    views of it have something in common that colour jitter, grayscale and blur leave (smooth colour fields alone
    do not: at the recipe's crops and colour jitter the loss hardly falls on them)."""
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(seed)
    h, w = size + size // 4, size + size // 2
    v = torch.arange(h, device=device, dtype=torch.float32).view(1, 1, h, 1) / h
    u = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, 1, w) / h
    out = torch.empty(n, 3, h, w, dtype=torch.uint8, device=device)
    for i in range(0, n, 64):
        m = min(64, n - i)
        r = lambda *shape: torch.rand(*shape, generator=g, device=device)  # noqa: E731
        theta, freq, phase = r(m, 3, 1, 1) * math.pi, 2 + 6 * r(m, 3, 1, 1), r(m, 3, 1, 1) * 2 * math.pi
        lum = torch.sin(2 * math.pi * freq * (u * theta.cos() + v * theta.sin()) + phase).mean(1, keepdim=True)
        lum = (lum - lum.amin((2, 3), keepdim=True)) / (lum.amax((2, 3), keepdim=True) - lum.amin((2, 3), keepdim=True))
        a, b = r(m, 3, 1, 1), r(m, 3, 1, 1)
        field = F.interpolate(r(m, 3, 6, 8), size=(h, w), mode="bicubic", align_corners=False)
        img = 0.75 * (a * lum + b * (1 - lum)) + 0.25 * field
        img = img + torch.randn(img.shape, generator=g, device=device) * (6 / 255)
        out[i:i + m] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return out


def loss_curve(ctx: Context, p: dict, tmp: Path) -> tuple[list[float], dict]:
    """Train the recipe's step for ``p["steps"]`` steps through ``fit``; the mean loss of each tenth (fit's own log:
    ``train.log_every`` = a tenth of the steps) and what was run."""
    import json

    from dist_awenc.config import PretrainConfig, load_config
    from dist_awenc.data.decode_views import crop_spec
    from dist_awenc.engine.loop import cosine_schedule, fit
    from dist_awenc.engine.plan import loop_settings
    from dist_awenc.ssl.pretrain import TrainPlan

    steps, b = p["steps"], p["batch"]
    over = [*p["overrides"], f"train.batch_size={b}", f"train.log_every={steps // 10}", "train.progress=false",
            f"run.out_dir={tmp}", *P.speed_overrides(p["mode"])]
    cfg = load_config(PretrainConfig, REPO / RECIPE, over)
    run_dir = Path(tempfile.mkdtemp(prefix="loss_", dir=tmp))
    P.reset_accelerate()
    accelerator = P.make_project_accelerator(cfg, run_dir, False)
    case = P.project_case(cfg, "simclr", steps, accelerator)
    spec = crop_spec(cfg.views, cfg.data.image_size, cfg.run.seed)
    source = PoolSource(make_pool(b * p["pool_batches"], cfg.data.image_size, ctx.device), b, spec)
    o = cfg.optim
    share = o.warmup_epochs / cfg.train.epochs if o.warmup_epochs else 0.0  # the recipe's: 10 of 100 epochs
    warmup = round(share * steps)
    base_lr = cosine_schedule(steps, warmup, o.min_lr_ratio, o.schedule)
    # one step past the last: fit logs step `steps` after its hook, then the hook stops it (no final checkpoint)
    settings = loop_settings(cfg.train, run_dir, TrainPlan(steps_per_epoch=source.batches, total_steps=steps + 1), "health")
    settings.checkpoint_every = 10**9

    def after_step(model, step: int) -> None:
        if step > steps:
            raise _Stop
        case.after_step(model, step)

    t = time.perf_counter()
    try:
        fit(accelerator, case.model, case.optimizer, source=source, make_inputs=case.make_inputs,
            lr_at=lambda s: base_lr(min(s, steps - 1)), settings=settings, config_yaml="health: true\n",
            after_step=after_step)
    except _Stop:
        pass
    seconds = time.perf_counter() - t
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tenths = [ln["loss"] for ln in lines if "loss" in ln][:10]
    info = {"lr": case.optimizer.param_groups[0]["initial_lr"], "warmup_steps": warmup, "optimizer": o.name,
            "loss_reduction": cfg.ssl.loss_reduction,
            "seconds": round(seconds, 1), "images_per_s": rates([seconds], b * (steps + 1))}
    return tenths, info


class _Stop(Exception):
    pass


def loss_row(ctx: Context, p: dict, tmp: Path) -> dict:
    mp, cl, _ = P.MODES[p["mode"]]
    name = f"loss falls: {p['model']} simclr, {p['steps']} steps of the recipe's step"
    settings = {"model": p["model"], "image_size": 224 if p["model"] == "resnet50_in224" else 32, "batch": p["batch"],
                "steps": p["steps"], "mixed_precision": mp, "channels_last": cl, "config": RECIPE,
                "overrides": " ".join(p["overrides"]) or None, "pool": p["batch"] * p["pool_batches"],
                "margin": LOSS_MARGIN}
    tenths, info = loss_curve(ctx, p, tmp)
    settings.update(optimizer=info["optimizer"], lr=round(info["lr"], 4), warmup_steps=info["warmup_steps"])
    if len(tenths) < 10 or not all(x == x and abs(x) < float("inf") for x in tenths):
        return row(name, settings, status="failed", note=f"expected 10 finite tenth means, got {tenths}",
                   loss_by_tenth=tenths)
    first, last = tenths[0], tenths[-1]
    ok = last <= (1 - LOSS_MARGIN) * first
    # NT-Xent with every similarity equal: ln(2B - 1) per view, twice that where the two directions are summed
    chance = math.log(2 * p["batch"] - 1) * (2 if info["loss_reduction"] == "sum" else 1)
    summary = (f"mean loss {first:.3f} in the first tenth, {last:.3f} in the last: {100 * (1 - last / first):.1f}% lower "
               f"(passes at {100 * LOSS_MARGIN:.0f}%); {'below' if last < chance else 'above'} the {chance:.2f} of "
               "uniform similarities")
    return row(name, settings, status="ok" if ok else "failed", note="" if ok else f"the loss did not fall: {summary}",
               summary=summary, loss_by_tenth=[round(x, 4) for x in tenths], first_tenth=first, last_tenth=last,
               uniform_similarity_loss=chance,
               images_per_s=info["images_per_s"], seconds=info["seconds"])
