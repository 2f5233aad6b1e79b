"""Suite ``e2e``: the real ``awenc pretrain`` under ``accelerate launch``, against the reference step alone.

The run is the stage as a user starts it: ``python -m accelerate.commands.launch
--num_processes 1 ... -m dist_awenc pretrain --config <config> <overrides>``,
fed by its own loader (the config's ``data.num_workers``) with its
augmentation, on generated data: ``fake`` held in memory at 32 px (as
CIFAR-10 is) or generated JPEGs read through ``imagefolder`` at 224 px.
Its images/s come from ``metrics.jsonl``: every ``train.log_every`` steps the
loop logs the wall clock, so each interval between two log lines is one
repetition (the first intervals, warm-up and loader start, are dropped).
The reference is the hand-written step of the ``step`` suite on a fixed batch
already on the device (no loader), timed in this process before and after
the run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import project as P
from benchmarks.common import REPO, Clock, Context, SuiteWriter, rates, ratio, row, short_error, stats
from benchmarks.data import write_jpegs
from benchmarks.step import build_pair, cleanup

COLUMNS = [("name", "case"), ("settings", "settings"), ("images_per_s", "awenc pretrain img/s"),
           ("reference_images_per_s", "reference step img/s"), ("ratio", "ratio")]
TABLE_SETTINGS = ["data", "image_size", "batch", "num_workers", "mixed_precision", "channels_last", "steps"]


def plan(ctx: Context, args) -> list[tuple[str, str, str, dict]]:
    if ctx.quick:
        cases = [("resnet18_cifar32", "simclr", "fp32",
                  dict(batch=4, data="fake", size=32, max_steps=4, log_every=1, skip=1, workers=0,
                       ref=dict(warmup=1, steps=1, reps=1), ref_after=False))]  # a schema check
    elif ctx.on_gpu:
        workers = max(1, min(10, (os.cpu_count() or 2) - 2))
        cases = [("resnet18_cifar32", "simclr", "bf16_cl",
                  dict(batch=512, data="fake", size=51200, max_steps=60, log_every=5, skip=2, workers=None,
                       ref=dict(warmup=3, steps=10, reps=3), ref_after=True)),
                 ("resnet50_in224", "simclr", "bf16_cl",
                  dict(batch=128, data="jpeg", size=10240, jpeg=(500, 375), max_steps=40, log_every=4, skip=2,
                       workers=workers, ref=dict(warmup=3, steps=6, reps=3), ref_after=True))]
    else:
        cases = [("resnet18_cifar32", "simclr", "fp32",
                  dict(batch=32, data="fake", size=512, max_steps=12, log_every=2, skip=1, workers=0,
                       ref=dict(warmup=1, steps=2, reps=3), ref_after=True))]
    sel = lambda value, allowed: allowed is None or value in allowed  # noqa: E731
    return [c for c in cases if sel(c[0], args.models) and sel(c[1], args.methods) and sel(c[2], args.modes)]


def run(ctx: Context, args) -> Path:
    out = SuiteWriter("e2e", ctx, COLUMNS, TABLE_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="awenc_bench_e2e_") as tmp:
        for model, method, mode, c in plan(ctx, args):
            name = f"{model} {method} {mode} awenc pretrain"
            if ctx.out_of_time():
                out.add(row(name, {"model": model}, status="skipped", note="suite time budget (--max-seconds) used up"))
                continue
            try:
                r = measure(ctx, model, method, mode, c, Path(tmp), args)
            except Exception as e:  # noqa: BLE001
                r = row(name, {"model": model, "method": method, "mode": mode}, status="failed", note=short_error(e))
            finally:
                cleanup(ctx)
            out.add(r)
    return out.json_path


def _ref_blocks(ctx: Context, loop, p: dict, warmup: int) -> list[float]:
    loop.run(warmup)
    secs = []
    for _ in range(p["reps"]):
        with Clock(ctx) as clk:
            loop.run(p["steps"])
        secs.append(clk.seconds)
    return secs


def measure(ctx: Context, model: str, method: str, mode: str, c: dict, tmp: Path, args) -> dict:
    p = {**c["ref"], "batch": c["batch"]}
    if args.reps:
        p["reps"] = args.reps
    mp, cl, comp = P.MODES[mode]
    feats = P.project_features()
    x = build_pair(ctx, model, method, mode, p, tmp, project=False)
    ref_secs = _ref_blocks(ctx, x.ref_loop, p, p["warmup"])

    size = P.IMAGE_SIZE[model]
    data_over = [f"data.image_size={size}"]
    data_info: dict = {"data": c["data"]}
    if c["data"] == "fake":
        data_over += ["data.name=fake", f"data.size={c['size']}"]
        data_info["dataset_size"] = c["size"]
    else:
        t = time.perf_counter()
        info = write_jpegs(tmp / f"jpeg_{model}", c["size"], c["jpeg"])
        data_over += ["data.name=imagefolder", f"data.root={info['root']}"]
        data_info.update(dataset_size=c["size"], jpeg=f"{info['width']}x{info['height']}", jpeg_mean_kib=info["mean_kib"],
                         jpeg_write_s=round(time.perf_counter() - t, 1))
    if c["workers"] is not None:
        data_over.append(f"data.num_workers={c['workers']}")
    run_dir = tmp / f"e2e_{model}_{method}_{mode}"
    overrides = [f"run.out_dir={tmp}", f"run.name={run_dir.name}", *data_over, f"train.batch_size={c['batch']}",
                 f"train.max_steps={c['max_steps']}", "train.epochs=100000", f"train.log_every={c['log_every']}",
                 f"train.checkpoint_every={c['max_steps']}", "train.progress=false", f"train.mixed_precision='{mp}'",
                 f"ssl.method={method}"]
    if feats["channels_last"]:
        overrides.append(f"train.channels_last={str(cl).lower()}")
    if feats["compile"]:
        overrides.append(f"train.compile={str(comp).lower()}")
    if feats["sync_bn"]:
        overrides.append("train.sync_bn=false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", mp, "--dynamo_backend", "inductor" if comp and not feats["compile"] else "no"]
    if not ctx.on_gpu:
        cmd.append("--cpu")
    cmd += ["-m", "dist_awenc", "pretrain", "--config", x.path, *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": str(ctx.threads) if not ctx.on_gpu else os.environ.get("OMP_NUM_THREADS", "1")}
    if ctx.on_gpu:
        torch.cuda.empty_cache()
    t0, started = time.perf_counter(), time.time()
    log = tmp / f"{run_dir.name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"awenc pretrain exited {proc.returncode}: {' | '.join(tail)[-400:]}")
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    marks = [(ln["step"], ln["time"]) for ln in lines if "time" in ln and ln.get("step") is not None]
    intervals = [((s1 - s0) * c["batch"], t1 - t0_) for (s0, t0_), (s1, t1) in zip(marks, marks[1:])][c["skip"]:]
    e2e = stats(n / dt for n, dt in intervals if dt > 0)

    if c["ref_after"]:
        ref_secs += _ref_blocks(ctx, x.ref_loop, p, 1)
    refr = rates(ref_secs, p["batch"] * p["steps"])
    settings = {"model": model, "method": method, "mode": mode, **data_info, "image_size": size, "batch": c["batch"],
                "num_workers": c["workers"] if c["workers"] is not None else x.cfg.data.num_workers,
                "mixed_precision": mp, "channels_last": cl and feats["channels_last"], "compile": comp,
                "config": x.path, "steps": c["max_steps"], "log_every": c["log_every"], "dropped_intervals": c["skip"],
                "launcher": "accelerate launch --num_processes 1", "reference_steps_per_rep": p["steps"],
                "reference_channels_last": cl, "threads": ctx.threads}
    note = "" if e2e else "too few logged intervals"
    return row(f"{model} {method} {mode} awenc pretrain", settings, status="ok" if e2e else "failed", note=note,
               images_per_s=e2e, reference_images_per_s=refr, ratio=ratio(e2e, refr), wall_s=round(wall, 1),
               time_to_first_log_s=round(marks[0][1] - started, 1) if marks else None,
               reference_loss_check=x.loss_check)
