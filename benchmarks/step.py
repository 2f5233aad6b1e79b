"""Suite ``step``: the project's training step against a plain hand-written step on views already on the device.

For each (model, method, mode) the project's step runs through the real
``fit`` on a fixed batch already on the device: its view making (the stage's
``make_inputs``: host draw, one copy, device kernels), forward, backward,
optimiser step, momentum update and the loop's bookkeeping. The reference
(:mod:`benchmarks.reference`) is the plain step a pure-PyTorch loop would
write, fed a pool of views made before the clock starts: forward, backward,
optimiser step, momentum update. The two run on the same device, in the same
process, one block of steps each in turn; their ratio shows everything the
project adds. Images/s counts source images (each gives two views; the
embedding step also feeds a marked, an augmented and a clean copy and the
key). TFLOP/s uses the FLOPs of one reference step counted by
``torch.utils.flop_counter`` on the meta device (same work on both sides).
"""
from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from benchmarks import project as P
from benchmarks.common import Clock, Context, SuiteWriter, rates, ratio, row, scaled, short_error, stats
from benchmarks.reference import ReferenceLoop, build_reference, copy_project_state, count_flops, premade_pool, unpack_inputs

METHODS = ("simclr", "moco_v2", "byol", "embed")
COLUMNS = [("name", "case"), ("settings", "settings"), ("images_per_s", "project img/s"),
           ("reference_images_per_s", "reference img/s"), ("ratio", "ratio"), ("tflops", "project TFLOP/s"),
           ("reference_tflops", "reference TFLOP/s")]
TABLE_SETTINGS = ["image_size", "batch", "optimizer", "mixed_precision", "channels_last", "compile"]
POOL = 2  # premade input sets the reference cycles through (two: no step reuses the previous step's tensors)
COMPILE_NEEDS_S = 90  # on a GPU, a torch.compile row is not started with less of the suite budget left


def plan(ctx: Context, args) -> tuple[list[tuple[str, str, str]], dict]:
    """Cases (model, method, mode), most important first, and the timing protocol per model."""
    if ctx.quick:
        # every method once; the embedding step also covers bf16 + channels_last
        cases = [("resnet18_cifar32", m, "fp32") for m in METHODS[:3]]
        cases += [("resnet18_cifar32", "embed", "bf16_cl"), ("resnet18_cifar32", "simclr", "bf16_cl_compile")]
        proto = {"resnet18_cifar32": dict(batch=2, warmup=1, steps=1, reps=1)}  # a schema check: seconds, not minutes
    elif ctx.on_gpu:
        r18 = [("resnet18_cifar32", m, "bf16_cl") for m in METHODS]
        r50 = [("resnet50_in224", m, "bf16_cl") for m in METHODS]
        cases = [r18[0], r50[0], *r18[1:], *r50[1:]]
        cases += [("resnet18_cifar32", m, "fp32") for m in METHODS] + [("resnet50_in224", "simclr", "fp32")]
        cases += [("resnet18_cifar32", "simclr", "bf16_cl_compile"), ("resnet50_in224", "simclr", "bf16_cl_compile")]
        proto = {"resnet18_cifar32": dict(batch=512, warmup=3, steps=10, reps=5),
                 "resnet50_in224": dict(batch=128, warmup=3, steps=6, reps=5)}
    else:  # CPU, full: what fits in a few minutes on a small machine
        cases = [("resnet18_cifar32", m, "fp32") for m in METHODS]
        cases += [("resnet18_cifar32", "simclr", "bf16_cl"), ("resnet50_in224", "simclr", "fp32"),
                  ("resnet18_cifar32", "simclr", "bf16_cl_compile")]
        proto = {"resnet18_cifar32": dict(batch=16, warmup=1, steps=1, reps=6),
                 "resnet50_in224": dict(batch=2, warmup=1, steps=1, reps=3)}
    sel = lambda value, allowed: allowed is None or value in allowed  # noqa: E731
    cases = [c for c in cases if sel(c[0], args.models) and sel(c[1], args.methods) and sel(c[2], args.modes)]
    for p in proto.values():
        for k in ("batch", "warmup", "steps", "reps"):
            if getattr(args, k, None):
                p[k] = getattr(args, k)
    return cases, proto


def run(ctx: Context, args) -> Path:
    out = SuiteWriter("step", ctx, COLUMNS, TABLE_SETTINGS)
    cases, proto = plan(ctx, args)
    feats = P.project_features()
    seen_views: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="awenc_bench_step_") as tmp:
        for model, method, mode in cases:
            p = proto[model]
            name = f"{model} {method} {mode}"
            base = {"model": model, "method": method, "mode": mode, "image_size": P.IMAGE_SIZE[model], "batch": p["batch"],
                    "warmup_steps": p["warmup"], "steps_per_rep": p["steps"], "reps": p["reps"]}
            if ctx.out_of_time():
                out.add(row(name, base, status="skipped", note="suite time budget (--max-seconds) used up"))
                continue
            if mode.endswith("compile") and ctx.quick:
                out.add(row(name, base, status="skipped", note="torch.compile is not timed in --quick (compilation takes minutes)"))
                continue
            if mode.endswith("compile") and ctx.on_gpu and _left(ctx) < COMPILE_NEEDS_S:
                out.add(row(name, base, status="skipped", note=f"under {COMPILE_NEEDS_S} s of the suite budget left "
                            "(--max-seconds): not enough to compile and time"))
                continue
            if model not in seen_views:
                seen_views.add(model)
                out.add(views_row(ctx, model, p, Path(tmp)))
            try:
                r = measure(ctx, model, method, mode, p, Path(tmp), feats, base)
            except Exception as e:  # noqa: BLE001  (one case failing must not lose the others)
                compile_case = mode.endswith("compile")
                r = row(name, base, status="unsupported" if compile_case else "failed",
                        note=("torch.compile failed here: " if compile_case else "") + short_error(e))
            finally:
                cleanup(ctx)
            out.add(r)
    return out.json_path


def _left(ctx: Context) -> float:
    return float("inf") if ctx.max_seconds is None else ctx.max_seconds - (time.perf_counter() - ctx.started)


def cleanup(ctx: Context) -> None:
    P.reset_accelerate()
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if ctx.on_gpu:
        torch.cuda.empty_cache()


def views_row(ctx: Context, model: str, p: dict, tmp: Path) -> dict:
    """The project's view making alone (``pretrain_inputs`` on a batch on the device: host draw, one copy, device
    kernels): the part of every project step the reference, fed premade views, does not do."""
    from dist_awenc.ssl.pretrain import pretrain_inputs

    cfg, path = P.pretrain_config(model, "simclr", batch=p["batch"], mode="fp32", out_dir=tmp)
    make_inputs = pretrain_inputs(cfg.views, cfg.run.seed, 0, 1)
    x = P.fixed_images(P.ProjectCase(None, None, make_inputs, None, cfg), p["batch"], ctx.device)
    batch = (x, torch.zeros(len(x), dtype=torch.long, device=ctx.device), torch.arange(len(x), device=ctx.device))
    n = max(p["steps"], 2)
    make_inputs(batch, 0)
    secs = []
    for r in range(p["reps"]):
        with Clock(ctx) as c:
            for i in range(n):
                make_inputs(batch, r * n + i + 1)
        secs.append(c.seconds)
    settings = {"model": model, "image_size": P.IMAGE_SIZE[model], "batch": p["batch"], "views": cfg.views.n_views,
                "config": path, "blur_p": cfg.views.blur_p, "made_by": "pretrain_inputs (host draw + device apply)"}
    return row(f"{model} views only", settings, kind="aux", images_per_s=rates(secs, p["batch"] * n))


def build_pair(ctx: Context, model: str, method: str, mode: str, p: dict, tmp: Path, *, project: bool = True,
               extra: tuple[str, ...] = ()) -> SimpleNamespace:
    """The project's case (with its Accelerator when ``project``) and the reference loop on premade views.

    Same weights on both sides; the reference's pool of views is made here, before any clock, by the project's
    ``make_inputs``, and both losses are computed on one set of those views (``loss_check``). ``extra``: config
    overrides (e.g. the optimiser of a ZeRO run).
    """
    from dist_awenc.engine.optim import build_optimizer

    mp, cl, comp = P.MODES[mode]
    total = p["warmup"] + p["reps"] * p["steps"]
    run_dir = tmp / f"{model}_{method}_{mode}"
    run_dir.mkdir(parents=True, exist_ok=True)  # as open_run makes it: fit writes engine.json there from its start
    cfg, path = P.pretrain_config(model, method, batch=p["batch"], mode=mode, out_dir=tmp, extra=list(extra))
    P.reset_accelerate()
    accelerator = P.make_project_accelerator(cfg, run_dir, comp) if project else None
    case = P.project_case(cfg, method, total, accelerator, device=ctx.device)
    ref = build_reference(method, cfg.encoder, cfg.ssl, embed=case.embed)
    same_arch, arch_note = True, ""
    try:
        copy_project_state(ref, case.model)
    except RuntimeError as e:
        same_arch, arch_note = False, short_error(e)
    images = P.fixed_images(case, p["batch"], ctx.device)
    batch = (images, torch.zeros(p["batch"], dtype=torch.long, device=ctx.device), torch.arange(p["batch"], device=ctx.device))
    case.model.to(ctx.device)
    ref.to(ctx.device)
    loss_check = check_losses(case, ref, batch) if same_arch else None
    if not project:
        case.model = None  # only the reference is timed (e2e)
    o = case.cfg.optim
    ref_opt = build_optimizer(ref, o.name, P.optimizer_lr(o, case.cfg.train), o.weight_decay, o.momentum)
    pool = premade_pool(case.make_inputs, batch, POOL, channels_last=cl)
    ref_loop = ReferenceLoop(ref, ref_opt, pool, device=ctx.device, mixed_precision=mp, channels_last=cl, compile=comp,
                             total_steps=total)
    flops = count_flops(lambda: build_reference(method, cfg.encoder, cfg.ssl, embed=_meta_embed(case.embed)),
                        _input_shapes(method, p["batch"], cfg.data.image_size))
    return SimpleNamespace(cfg=cfg, path=path, case=case, accelerator=accelerator, ref_loop=ref_loop, images=images,
                           run_dir=run_dir, same_arch=same_arch, arch_note=arch_note, loss_check=loss_check, flops=flops,
                           mp=mp, cl=cl, comp=comp, optimizer=o.name)


def measure(ctx: Context, model: str, method: str, mode: str, p: dict, tmp: Path, feats: dict, base: dict) -> dict:
    x = build_pair(ctx, model, method, mode, p, tmp)
    ref_secs: list[float] = []

    def reference_block(k: int) -> None:
        if k == 0:
            x.ref_loop.run(p["warmup"])
        with Clock(ctx) as c:
            x.ref_loop.run(p["steps"])
        ref_secs.append(c.seconds)

    proj_secs = P.run_fit(ctx, x.case, x.accelerator, x.images, x.run_dir, warmup=p["warmup"], steps=p["steps"],
                          reps=p["reps"], between=reference_block)
    n_img = p["batch"] * p["steps"]
    proj, refr = rates(proj_secs, n_img), rates(ref_secs, n_img)
    paired = stats(b / a for a, b in zip(proj_secs, ref_secs))  # project / reference images/s, block by block
    tf = (lambda s: scaled(s, x.flops / p["batch"] / 1e12)) if x.flops else (lambda s: None)
    settings = {**base, "config": x.path, "optimizer": x.optimizer, "mixed_precision": x.mp, "channels_last": x.cl,
                "project_channels_last": x.cl and feats["channels_last"], "compile": x.comp,
                "compile_via": ("train.compile" if feats["compile"] else "ACCELERATE_DYNAMO_BACKEND") if x.comp else None,
                "views_per_image": 2, "threads": torch.get_num_threads(),
                "project_step": "fit: views made in the step (make_inputs), forward, backward, optimiser, momentum, bookkeeping",
                "reference_step": f"plain step on premade views already on the device (a pool of {POOL}, cycled)"}
    note = ""
    if x.cl and not feats["channels_last"]:
        note = "project has no channels_last option: measured without it (the reference with it)"
    if not x.same_arch:
        note = (note + "; " if note else "") + f"reference does not load the project's weights: {x.arch_note}"
    # the headline ratio pairs each project block with the reference block next to it in time: load drift cancels
    return row(f"{model} {method} {mode}", settings, note=note, images_per_s=proj, reference_images_per_s=refr,
               ratio=paired["median"] if paired else None, ratio_of_medians=ratio(proj, refr), paired_ratio=paired,
               tflops=tf(proj), reference_tflops=tf(refr), flops_per_image=(x.flops / p["batch"]) if x.flops else None,
               loss_check=x.loss_check, same_architecture=x.same_arch)


def check_losses(case, ref, batch) -> Optional[dict]:
    """Both sides' loss on the same views (made once by the project's ``make_inputs``), same weights, fp32: they must
    agree (the reference is the same step)."""
    inputs = case.make_inputs(batch, 10**6)
    case.model.train()
    ref.train()
    with torch.no_grad():
        lp = float(case.model(inputs)["loss"])
        lr = float(ref(*unpack_inputs(inputs))[0])
    return {"project": lp, "reference": lr, "abs_diff": abs(lp - lr)}


def _meta_embed(embed: Optional[dict]) -> Optional[dict]:
    if embed is None:
        return None
    return {**embed, "delta": torch.zeros(embed["delta"].shape), "key": torch.zeros(embed["key"].shape)}


def _input_shapes(method: str, b: int, s: int) -> list[tuple[int, ...]]:
    views = [(b, 3, s, s), (b, 3, s, s)]
    if method == "embed":
        return views + [(b, 3, s, s), (b, 3, s, s), (1, 3, s, s)]
    return views
