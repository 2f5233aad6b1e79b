"""Inside a sweep job: run tasks, record each failure in ``errors/<id>.json``; the sbatch templates' entry point.

``python -m dist_awenc.launch.sweep work SWEEP_DIR --index I --per-job K`` runs :func:`main`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from dist_awenc.errors import AwencError, ConfigError
from dist_awenc.files import atomic_write_text
from dist_awenc.launch.sweep.folder import Sweep
from dist_awenc.launch.sweep.plan import null_pretrain_configs, robustness_config

FAIL_ENV = "AWENC_SWEEP_FAIL"  # comma-separated task-id patterns that raise on purpose (rehearsing failures)


class SweepTaskError(RuntimeError):
    """Some tasks of a job failed (each wrote errors/<id>.json); the others finished."""


def _injected(task_id: str) -> bool:
    patterns = [p.strip() for p in os.environ.get(FAIL_ENV, "").split(",") if p.strip()]
    return any(fnmatch.fnmatchcase(task_id, p) for p in patterns)


def _job_id() -> str:
    arr, idx = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if arr and idx:
        return f"{arr}_{idx}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or f"pid{os.getpid()}"


def _record_error(sweep: Sweep, task_id: str, e: BaseException) -> str:
    line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
    body = {"id": task_id, "error": line, "job": _job_id(), "host": socket.gethostname(), "time": time.time(),
            "traceback": traceback.format_exc(limit=8)}
    path = sweep.error_path(task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(body, indent=1))
    return line


def record_job_failure(sweep_dir: str | Path, task_ids: list[str], e: BaseException) -> None:
    """A job that failed outside its tasks (before the first, or loading the sweep): ``errors/<id>.json`` for each of
    its tasks that has neither a result nor an error, so `status` and `collect` name the cause. Call it in an
    ``except`` block."""
    try:
        sweep = Sweep(sweep_dir)
        for tid in task_ids:
            if tid in sweep.tasks and not sweep.done(tid) and not sweep.error_path(tid).exists():
                _record_error(sweep, tid, e)
    except Exception:  # noqa: BLE001 - the job's own error is raised anyway; this is only a record of it
        pass


def _run_null(sweep: Sweep, tid: str) -> None:
    from dist_awenc.config import CalibrateConfig, load_config
    from dist_awenc.runs import reuse_or_run
    from dist_awenc.ssl.pretrain import pretrain

    task = sweep.tasks[tid]
    ccfg = load_config(CalibrateConfig, sweep.root / "null.yaml")
    cfg = null_pretrain_configs(ccfg)[task.name]
    here = os.getcwd()
    os.chdir(sweep.cwd)  # the config is as written: `awenc calibrate` started there reuses this very run folder
    try:
        path = Path(reuse_or_run(cfg, pretrain, "encoder.safetensors")).resolve()
    finally:
        os.chdir(here)
    out = sweep.result_path(tid)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"encoder": str(path), "run_dir": str(path.parent)}, indent=1))


def run_tasks(sweep_dir: Path, task_ids: list[str]) -> dict[str, Any]:
    """The body of every sweep job: run each task that has no result yet, in order.

    A failing task writes ``errors/<id>.json`` and the job goes on with the
    next; at the end the job raises :class:`SweepTaskError` naming them, so the
    scheduler and submitit record the failure too.
    """
    import torch

    from dist_awenc.stages.robustness import Context, run_task

    sweep = Sweep(sweep_dir)
    cfg = sweep.config
    unknown = [i for i in task_ids if i not in sweep.tasks]
    if unknown:
        raise ConfigError(f"task '{unknown[0]}' is not in {sweep.root / 'sweep.json'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.slurm.cpus_per_task)
    contexts: dict[str, Any] = {}
    done, failed = [], {}
    try:
        for tid in task_ids:
            task = sweep.tasks[tid]
            if sweep.done(tid):
                done.append(tid)
                continue
            try:
                if _injected(tid):
                    raise RuntimeError(f"injected failure ({FAIL_ENV}) in task {tid}")
                if task.kind == "null":
                    _run_null(sweep, tid)
                else:
                    if task.target not in contexts:
                        try:
                            r = robustness_config(cfg, task.target, sweep.root)
                            contexts[task.target] = Context.load(r.encoder, r.secret, r.data, r.options, r.probe, r.verify)
                        except Exception as e:  # noqa: BLE001 - every task of this target fails the same way
                            contexts[task.target] = e
                    ctx = contexts[task.target]
                    if isinstance(ctx, Exception):
                        raise ctx
                    run_task(ctx, task.robustness, sweep.target_dir(task.target))
                sweep.error_path(tid).unlink(missing_ok=True)
                done.append(tid)
            except Exception as e:  # noqa: BLE001 - recorded, then reported at the end of the job
                failed[tid] = _record_error(sweep, tid, e)
    finally:
        torch.set_num_threads(threads)
    if failed:
        first = next(iter(failed))
        raise SweepTaskError(f"{len(failed)} of {len(task_ids)} task(s) failed; {first}: {failed[first]}")
    return {"done": done}


def work(sweep_dir: str, index: int, per_job: int) -> dict[str, Any]:
    """Run the ``index``-th chunk of ``per_job`` tasks in plan order (slurm/sweep_array.sbatch)."""
    sweep = Sweep(sweep_dir)
    ids = list(sweep.tasks)[index * per_job:(index + 1) * per_job]
    if not ids:
        raise ConfigError(f"chunk {index} of {per_job} task(s) is past the {len(sweep.tasks)} tasks of {sweep.root}")
    return run_tasks(sweep.root, ids)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dist_awenc.launch.sweep work SWEEP_DIR --index I --per-job K`` (plain sbatch arrays)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dist_awenc.launch.sweep")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("work", help="run one chunk of a prepared sweep (inside an array element)")
    w.add_argument("sweep_dir")
    w.add_argument("--index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    w.add_argument("--per-job", type=int, default=1)
    args = p.parse_args(argv)
    try:
        work(args.sweep_dir, args.index, args.per_job)
    except (AwencError, SweepTaskError) as e:
        print(f"sweep work: error: {e}", file=sys.stderr)
        return 2
    return 0
