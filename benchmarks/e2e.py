"""Suite ``e2e``: the real ``awenc pretrain`` under ``accelerate launch``, against the plain reference step.

The run is the stage as a user starts it: ``python -m accelerate.commands.launch
<launcher options> -m dist_awenc pretrain --config <config> <overrides>``,
fed by its own loader (the config's ``data.num_workers``) with its views, on
generated data: ``fake`` held in memory at 32 px (as CIFAR-10 is) or
generated JPEGs read through ``imagefolder`` at 224 px. Launchers
(``--launchers``): ``single`` (one process; on a GPU through
``configs/accelerate/1gpu.yaml``), ``ddp`` (``configs/accelerate/8gpu.yaml``)
and ``zero2`` (``configs/accelerate/8gpu_zero2.yaml``: DeepSpeed ZeRO-2, with
SGD since the project refuses LARS under ZeRO), the last two with one process
per visible GPU (one on a CPU).

Its images/s come from ``metrics.jsonl``: every ``train.log_every`` steps the
loop logs the wall clock, so each interval between two log lines is one
repetition (the first intervals, warm-up and loader start, are dropped).
The reference is the ``step`` suite's plain hand-written step on views made
before the clock starts and already on the device (no loader, no view
making), with the run's optimiser, timed in this process before and after
the run; ``ratio`` = run images/s / (processes x reference images/s).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import project as P
from benchmarks.common import REPO, Clock, Context, SuiteWriter, rates, row, short_error, stats
from benchmarks.data import write_jpegs
from benchmarks.step import build_pair, cleanup

COLUMNS = [("name", "case"), ("settings", "settings"), ("images_per_s", "awenc pretrain img/s"),
           ("reference_images_per_s", "reference step img/s"), ("ratio", "ratio")]
TABLE_SETTINGS = ["launcher", "processes", "data", "image_size", "batch", "num_workers", "optimizer", "mixed_precision",
                  "channels_last", "steps"]
LAUNCHERS = ("single", "ddp", "zero2")
LAUNCH_CONFIG = {"ddp": "configs/accelerate/8gpu.yaml", "zero2": "configs/accelerate/8gpu_zero2.yaml"}
ZERO_OPTIM = ("optim.name=sgd", "optim.lr=0.1")  # LARS (the configs' optimiser) is refused under ZeRO
LABEL = {"single": "awenc pretrain", "ddp": "awenc pretrain DDP", "zero2": "awenc pretrain ZeRO-2"}


def plan(ctx: Context, args) -> list[tuple[str, str, str, str, dict]]:
    """Cases (model, method, mode, launcher, sizes), most important first."""
    launchers = args.launchers or (LAUNCHERS if ctx.on_gpu and not ctx.quick else ("single",))
    if ctx.quick:  # a schema check: tiny sizes, a few steps
        c = dict(batch=2, data="fake", size=32, max_steps=4, log_every=1, skip=1, workers=0,
                 ref=dict(warmup=1, steps=1, reps=1), ref_after=False)
        cases = [("resnet18_cifar32", "simclr", "fp32", "single", c)]
        cases += [("resnet18_cifar32", "simclr", "bf16_cl", launcher, c) for launcher in ("ddp", "zero2")]
    elif ctx.on_gpu:
        workers = max(1, min(10, (os.cpu_count() or 2) - 2))
        r50 = dict(batch=128, data="jpeg", size=10240, jpeg=(500, 375), max_steps=40, log_every=4, skip=2,
                   workers=workers, ref=dict(warmup=3, steps=6, reps=3), ref_after=True)
        r18 = dict(batch=512, data="fake", size=51200, max_steps=60, log_every=5, skip=2, workers=None,
                   ref=dict(warmup=3, steps=10, reps=3), ref_after=True)
        cases = [("resnet50_in224", "simclr", "bf16_cl", launcher, r50) for launcher in LAUNCHERS]
        cases.append(("resnet18_cifar32", "simclr", "bf16_cl", "single", r18))
    else:
        c = dict(batch=32, data="fake", size=512, max_steps=12, log_every=2, skip=1, workers=0,
                 ref=dict(warmup=1, steps=2, reps=3), ref_after=True)
        cases = [("resnet18_cifar32", "simclr", "fp32", "single", c)]
        cases += [("resnet18_cifar32", "simclr", "bf16_cl", launcher, c) for launcher in ("ddp", "zero2")]
    sel = lambda value, allowed: allowed is None or value in allowed  # noqa: E731
    return [c for c in cases if c[3] in launchers and sel(c[0], args.models) and sel(c[1], args.methods)
            and sel(c[2], args.modes)]


def processes(ctx: Context, launcher: str) -> int:
    return max(1, torch.cuda.device_count()) if ctx.on_gpu and launcher != "single" else 1


def run(ctx: Context, args) -> Path:
    out = SuiteWriter("e2e", ctx, COLUMNS, TABLE_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="awenc_bench_e2e_") as tmp:
        jpegs: dict[str, dict] = {}  # generated once per model, shared by its launchers
        cases = plan(ctx, args)
        while cases:
            model, method, mode, launcher, c = cases.pop(0)
            n = processes(ctx, launcher)
            name = f"{model} {method} {mode} {LABEL[launcher]}" + (f" x{n}" if launcher != "single" else "")
            base = {"model": model, "method": method, "mode": mode, "launcher": launcher, "processes": n}
            if ctx.out_of_time():
                out.add(row(name, base, status="skipped", note="suite time budget (--max-seconds) used up"))
                continue
            if launcher == "zero2" and not all(importlib.util.find_spec(m) for m in ("deepspeed", "transformers")):
                out.add(row(name, base, status="not installed",
                            note="deepspeed (and transformers, which Accelerate's DeepSpeed plugin reads) not importable: "
                                 "the ZeRO-2 run is skipped (pip install -e '.[deepspeed]'; a GPU machine: the wheels "
                                 "from gpu_checks.sh --prepare)"))
                continue
            try:
                r = measure(ctx, name, base, c, Path(tmp), args, jpegs)
            except Exception as e:  # noqa: BLE001
                r = row(name, base, status="failed", note=short_error(e))
            finally:
                cleanup(ctx)
            out.add(r)
            if launcher == "zero2" and r["status"] == "failed" and mode != "fp32":
                # what ZeRO-2 itself costs, without the precision and memory format that failed
                cases.insert(0, (model, method, "fp32", launcher, {**c, "fallback_for": mode}))
    return out.json_path


def _ref_blocks(ctx: Context, loop, p: dict, warmup: int) -> list[float]:
    loop.run(warmup)
    secs = []
    for _ in range(p["reps"]):
        with Clock(ctx) as clk:
            loop.run(p["steps"])
        secs.append(clk.seconds)
    return secs


def _data(ctx: Context, model: str, c: dict, tmp: Path, jpegs: dict) -> tuple[list[str], dict]:
    """Data overrides of the run and what they describe (generated JPEGs written once per model)."""
    over = [f"data.image_size={P.IMAGE_SIZE[model]}"]
    info: dict = {"data": c["data"], "dataset_size": c["size"]}
    if c["data"] == "fake":
        over += ["data.name=fake", f"data.size={c['size']}"]
    else:
        if model not in jpegs:
            t = time.perf_counter()
            jpegs[model] = {**write_jpegs(tmp / f"jpeg_{model}", c["size"], c["jpeg"]), "write_s": round(time.perf_counter() - t, 1)}
        j = jpegs[model]
        over += ["data.name=imagefolder", f"data.root={j['root']}"]
        info.update(jpeg=f"{j['width']}x{j['height']}", jpeg_mean_kib=j["mean_kib"], jpeg_write_s=j["write_s"])
    if c["workers"] is not None:
        over.append(f"data.num_workers={c['workers']}")
    return over, info


def command(ctx: Context, launcher: str, n: int, mp: str, dynamo: str) -> tuple[list[str], dict]:
    """``accelerate launch`` as a user runs it, and the environment it needs beyond the caller's."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env: dict[str, str] = {}
    if launcher == "single":
        cmd += ["--config_file", "configs/accelerate/1gpu.yaml"] if ctx.on_gpu else ["--cpu"]
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", mp]
    else:
        cmd += ["--config_file", LAUNCH_CONFIG[launcher], "--num_processes", str(n), "--num_machines", "1"]
        if launcher == "ddp":
            cmd += ["--mixed_precision", mp]  # zero2: DeepSpeed takes the precision from train.mixed_precision
            if not ctx.on_gpu:
                env["ACCELERATE_USE_CPU"] = "1"  # the README's CPU route: torchrun processes on gloo
    return cmd + ["--dynamo_backend", dynamo], env


def _timeout(ctx: Context) -> float:
    """A launch may run to the end of the suite budget, plus a minute (900 s without a budget)."""
    if ctx.max_seconds is None:
        return 900.0
    return max(120.0, ctx.max_seconds - (time.perf_counter() - ctx.started) + 60)


def failure(log: str) -> str:
    """The error a failed launch died of: its last exception line (torchrun's own wrapper error skipped), else the tail."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln).strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", ln) and "ChildFailedError" not in ln]
    return (errors[-1] if errors else " | ".join(lines[-3:]))[-400:]


def measure(ctx: Context, name: str, base: dict, c: dict, tmp: Path, args, jpegs: dict) -> dict:
    from dist_awenc.config import PretrainConfig, load_config

    model, method, mode, launcher, n = (base[k] for k in ("model", "method", "mode", "launcher", "processes"))
    p = {**c["ref"], "batch": c["batch"]}
    if args.reps:
        p["reps"] = args.reps
    mp, cl, comp = P.MODES[mode]
    feats = P.project_features()
    extra = ZERO_OPTIM if launcher == "zero2" else ()
    x = build_pair(ctx, model, method, mode, p, tmp, project=False, extra=extra)
    ref_secs = _ref_blocks(ctx, x.ref_loop, p, p["warmup"])

    data_over, data_info = _data(ctx, model, c, tmp, jpegs)
    run_dir = tmp / f"e2e_{model}_{method}_{mode}_{launcher}"
    overrides = [f"run.out_dir={tmp}", f"run.name={run_dir.name}", *data_over, f"train.batch_size={c['batch'] * n}",
                 f"train.max_steps={c['max_steps']}", "train.epochs=100000", f"train.log_every={c['log_every']}",
                 f"train.checkpoint_every={c['max_steps']}", "train.progress=false", f"ssl.method={method}", *extra]
    if feats["checkpoint_epochs"]:  # the recipes set their interval in epochs: one form at a time (#31)
        overrides.append("train.checkpoint_every_epochs=null")
    keep_sync_bn = feats["sync_bn"] and ctx.on_gpu and launcher != "single"  # the config's own (SyncBN needs CUDA)
    overrides += P.speed_overrides(mode, keep_sync_bn=keep_sync_bn)
    cmd, launch_env = command(ctx, launcher, n, mp, "inductor" if comp and not feats["compile"] else "no")
    cmd += ["-m", "dist_awenc", "pretrain", "--config", x.path, *overrides]
    env = {**os.environ, **launch_env,
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": str(ctx.threads) if not ctx.on_gpu else os.environ.get("OMP_NUM_THREADS", "1")}
    if ctx.on_gpu:
        torch.cuda.empty_cache()
    t0, started = time.perf_counter(), time.time()
    log = tmp / f"{run_dir.name}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=_timeout(ctx))
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"awenc pretrain still running after {e.timeout:.0f} s (suite budget): killed") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"awenc pretrain exited {proc.returncode}: {failure(log.read_text())}")
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    marks = [(ln["step"], ln["time"]) for ln in lines if "time" in ln and ln.get("step") is not None]
    intervals = [((s1 - s0) * c["batch"] * n, t1 - t0_) for (s0, t0_), (s1, t1) in zip(marks, marks[1:])][c["skip"]:]
    e2e = stats(k / dt for k, dt in intervals if dt > 0)

    if c["ref_after"]:
        ref_secs += _ref_blocks(ctx, x.ref_loop, p, 1)
    refr = rates(ref_secs, p["batch"] * p["steps"])
    sync_bn = load_config(PretrainConfig, REPO / x.path).train.sync_bn if keep_sync_bn else False
    settings = {**base, **data_info, "image_size": P.IMAGE_SIZE[model], "batch": c["batch"] * n, "per_process_batch": c["batch"],
                "num_workers": c["workers"] if c["workers"] is not None else x.cfg.data.num_workers,
                "optimizer": x.optimizer, "mixed_precision": mp, "channels_last": cl and feats["channels_last"],
                "compile": comp, "sync_bn": sync_bn, "config": x.path, "steps": c["max_steps"], "log_every": c["log_every"],
                "dropped_intervals": c["skip"],
                "command": " ".join(["accelerate launch", *cmd[3:cmd.index("-m", 3)], "-m dist_awenc pretrain --config", x.path]),
                "reference": "plain step on premade views on the device (step suite), one process",
                "reference_steps_per_rep": p["steps"], "reference_channels_last": cl, "threads": ctx.threads}
    notes = [] if e2e else ["too few logged intervals"]
    if launcher == "ddp" and n == 1:
        notes.append("one process: Accelerate starts it through torchrun with a process group but wraps no DDP "
                     "(it does with 2 or more)")
    if c.get("fallback_for"):
        notes.append(f"run because the {c['fallback_for']} ZeRO-2 run failed: ZeRO-2 alone, fp32, no channels_last")
    if launcher == "zero2":
        notes.append(f"optimizer {x.optimizer} (LARS is refused under ZeRO)"
                     + ("; one process: the DeepSpeed engine runs, nothing is sharded" if n == 1 else ""))
    return row(name, settings, status="ok" if e2e else "failed", note="; ".join(notes),
               images_per_s=e2e, reference_images_per_s=refr,
               ratio=e2e["median"] / (n * refr["median"]) if e2e and refr else None, wall_s=round(wall, 1),
               time_to_first_log_s=round(marks[0][1] - started, 1) if marks else None,
               reference_loss_check=x.loss_check)
