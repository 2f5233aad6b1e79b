"""What a sweep folder says: each task's state (status, wait) and the collected tables (collect).

Read from the files the tasks write, the scheduler and the jobs' stderr logs,
as text; nothing is unpickled and nothing here imports torch (``collect``
imports the robustness tables only where results exist).
"""
from __future__ import annotations

import csv
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from dist_awenc.files import atomic_path, atomic_write_text
from dist_awenc.launch.cluster import classify, last_error_line, process_alive, scheduler_states, submitit_outcome
from dist_awenc.launch.sweep.folder import Sweep

STATES = ("done", "running", "pending", "failed", "missing", "unknown")


@dataclass
class TaskState:
    id: str
    state: str  # one of STATES
    job: str = ""
    error: str = ""


def task_states(sweep: Sweep) -> dict[str, TaskState]:
    """done / running / pending / failed / missing (never submitted) / unknown (the scheduler does not answer).

    From the files the tasks write first (results, ``errors/<id>.json``), then
    the scheduler (squeue, sacct, or the local job's process), then the
    exception line of the job's stderr log. Nothing is unpickled.
    """
    latest = sweep.latest_jobs()
    open_slurm = sorted({job for tid, (job, ex) in latest.items() if ex == "slurm" and not sweep.done(tid)})
    squeue = scheduler_states(open_slurm) if open_slurm else {}
    answered = bool(squeue) or not open_slurm or _scheduler_answers()
    out: dict[str, TaskState] = {}
    for tid in sweep.tasks:
        if sweep.done(tid):
            out[tid] = TaskState(tid, "done", latest.get(tid, ("", ""))[0])
            continue
        err = sweep.error_path(tid)
        if err.exists():
            try:
                body = json.loads(err.read_text())
                body = body if isinstance(body, dict) else {}
            except (OSError, ValueError):
                body = {"error": f"unreadable error file {err}"}
            out[tid] = TaskState(tid, "failed", str(body.get("job", "")), str(body.get("error", "")))
            continue
        if tid not in latest:
            out[tid] = TaskState(tid, "missing")
            continue
        job, ex = latest[tid]
        out[tid] = _job_state(sweep, tid, job, ex, squeue, answered)
    return out


def _scheduler_answers() -> bool:
    from dist_awenc.launch.cluster import slurm_available

    return slurm_available()


def _job_state(sweep: Sweep, tid: str, job: str, ex: str, squeue: dict[str, str], answered: bool) -> TaskState:
    """A task with neither result nor error file, from its latest job: still queued or running, else failed."""
    if ex == "slurm":
        state = squeue.get(job)
        if state is not None and classify(state) != "over":
            return TaskState(tid, classify(state), job)
        if state is None and not answered:
            return TaskState(tid, "unknown", job, "the SLURM controller does not answer")
        why = f"job {job} ended{' ' + state if state else ''} without a result"
    elif ex == "local":
        if job.isdigit() and process_alive(int(job)):
            return TaskState(tid, "running", job)
        why = f"local job {job} ended without a result"
    else:
        return TaskState(tid, "missing", job, "the in-process (debug) run stopped before this task")
    outcome = submitit_outcome(sweep.logs, job)  # the job's stderr log, as text
    if outcome and outcome[0] == "error":
        why += f": {last_error_line(outcome[1])}"
    else:
        why += f" (killed, cancelled, out of memory or time?); see {sweep.logs / job}"
    return TaskState(tid, "failed", job, why)


def counts(states: dict[str, TaskState]) -> dict[str, int]:
    return {s: sum(t.state == s for t in states.values()) for s in STATES}


def status(sweep: Sweep, out=None, limit: int = 20) -> dict[str, TaskState]:
    """Print the counts, each failed task with its error, and the queued or running jobs with their tasks."""
    out = out or sys.stdout
    states = task_states(sweep)
    c = counts(states)
    print(f"{sweep.root}: {len(states)} tasks: " + ", ".join(f"{c[s]} {s}" for s in STATES if c[s] or s in ("done", "failed")),
          file=out)
    failed = [t for t in states.values() if t.state == "failed"]
    for t in failed[:limit]:
        print(f"  failed   {t.id}" + (f"  [{t.job}]" if t.job else "") + f"  {t.error}", file=out)
    if len(failed) > limit:
        print(f"  ... and {len(failed) - limit} more failed (failures.json after `awenc sweep collect`)", file=out)
    for state in ("running", "pending", "unknown", "missing"):
        by_job: dict[str, list[str]] = {}
        for t in states.values():
            if t.state == state:
                by_job.setdefault(t.job, []).append(t.id)
        for job, ids in list(by_job.items())[:limit]:
            shown = ", ".join(ids[:3]) + (f", ... (+{len(ids) - 3})" if len(ids) > 3 else "")
            print(f"  {state:<8} " + (f"[{job}] " if job else "") + f"{len(ids)} task(s): {shown}", file=out)
        if len(by_job) > limit:
            print(f"  ... and {len(by_job) - limit} more {state} job(s)", file=out)
    return states


def wait(sweep: Sweep, poll_s: float = 5.0, timeout_s: Optional[float] = None, out=None) -> dict[str, TaskState]:
    """Block until no task is running, pending or unknown; prints the counts whenever they change."""
    out = out or sys.stdout
    start, last = time.time(), None
    while True:
        states = task_states(sweep)
        c = counts(states)
        if c != last:
            print(f"sweep {sweep.root.name}: " + ", ".join(f"{c[s]} {s}" for s in STATES if c[s]), file=out, flush=True)
            last = c
        if not c["running"] and not c["pending"] and not c["unknown"]:  # unknown: the controller may come back
            return states
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"sweep {sweep.root} still has {c['running']} running and {c['pending']} pending tasks")
        time.sleep(poll_s)


def collect(sweep: Sweep, out=None) -> dict[str, Any]:
    """Gather every finished task into one table; name every failed task with its error. Idempotent.

    Per target, ``targets/<t>/robustness.{csv,json,png}`` (and ``roc.png``
    with ``verify.calibration``) are exactly what ``awenc robustness`` writes
    for the same grid; ``sweep.csv`` / ``sweep.parquet`` stack them with a
    ``target`` column; ``failures.json`` lists the failed tasks.
    """
    out = out or sys.stdout
    states = task_states(sweep)
    rows: list[dict[str, str]] = []
    summaries = {}
    with_results = [t for t in sweep.targets() if any((sweep.target_dir(t) / "tasks").glob("*.json"))]
    if with_results:  # the per-target tables and plots are `awenc robustness`'s (which imports torch)
        from dist_awenc.stages.robustness import collect as collect_target
        from dist_awenc.stages.robustness import write_csv

        cfg = sweep.config
        for target in with_results:
            tdir = sweep.target_dir(target)
            summaries[target] = collect_target(tdir, cfg.grid.utility_drop, cfg.verify.calibration,
                                               cfg.grid.advantage_kept)
            with (tdir / "robustness.csv").open(newline="") as f:
                rows += [{"target": target, **r} for r in csv.DictReader(f)]
        if rows:
            write_csv(sweep.root / "sweep.csv", rows)
            _write_parquet(sweep.root / "sweep.parquet", rows)
    failed = [asdict(t) for t in states.values() if t.state == "failed"]
    atomic_write_text(sweep.root / "failures.json", json.dumps(failed, indent=1))
    null_done = {t.name: json.loads(sweep.result_path(tid).read_text())["encoder"]
                 for tid, t in sweep.tasks.items() if t.kind == "null" and sweep.done(tid)}
    summary = {"tasks": len(states), "counts": counts(states), "rows": len(rows), "targets": summaries,
               "failed": {f["id"]: f["error"] for f in failed}, "null_encoders": null_done}
    atomic_write_text(sweep.root / "summary.json", json.dumps(summary, indent=1, default=str))
    c = summary["counts"]
    parquet = " (+ parquet)" if (sweep.root / "sweep.parquet").exists() else ""
    where = f" -> {sweep.root / 'sweep.csv'}{parquet}" if rows else ""
    print(f"collected {c['done']}/{len(states)} tasks{where}", file=out)
    if null_done:
        print(f"  {len(null_done)} null encoder(s) pre-trained -> {Path(next(iter(null_done.values()))).parent.parent}", file=out)
    for target, s in summaries.items():
        for mode, m in s["modes"].items():
            print(f"  {target} {mode:<15} TPR {m['tpr']:.3f} ({m['detected']}/{m['of']} thefts)", file=out)
        if s["not_thefts"]:
            print(f"  {target} not a theft (kept under {s['advantage_kept']:g} of f0's advantage over random init, "
                  f"or lost over {100 * s['utility_drop']:g} points): "
                  + ", ".join(f"{r['derivative']} s{r['seed']}" for r in s["not_thefts"]), file=out)
    for f in failed:
        print(f"  failed {f['id']}: {f['error']}", file=out)
    left = c["running"] + c["pending"] + c["missing"] + c["unknown"]
    if left:
        print(f"  {left} task(s) not finished: {c['running']} running, {c['pending']} pending, {c['missing']} missing", file=out)
    return summary


def typed_columns(rows: list[dict[str, str]]) -> dict[str, list[Any]]:
    """CSV strings back to bool / int / float / str, one type per column ('' is missing)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cols: dict[str, list[Any]] = {}
    for k in keys:
        raw = [r.get(k, "") for r in rows]
        vals = [v for v in raw if v != ""]
        if vals and all(v in ("True", "False") for v in vals):
            cols[k] = [None if v == "" else v == "True" for v in raw]
        elif vals and all(re.fullmatch(r"-?\d+", v) for v in vals):
            cols[k] = [None if v == "" else int(v) for v in raw]
        else:
            try:
                cols[k] = [None if v == "" else float(v) for v in raw]
            except ValueError:
                cols[k] = [None if v == "" else v for v in raw]
    return cols


def _write_parquet(path: Path, rows: list[dict[str, str]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print(f"note: pyarrow is not installed; no {path.name} (pip install 'dist_awenc[slurm]')", file=sys.stderr)
        return
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(typed_columns(rows)), tmp)
