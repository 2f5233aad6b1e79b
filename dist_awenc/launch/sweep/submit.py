"""Submitting a sweep's tasks: SLURM job arrays, local processes, or this process (debug)."""
from __future__ import annotations

import math
import time

from dist_awenc.launch.cluster import (SlurmSection, balanced, deferred_interrupts, make_executor, max_array_size,
                                       resolve_executor, split, submission_errors)
from dist_awenc.launch.sweep.folder import Sweep


def _time_limit(slurm: SlurmSection, null: bool) -> int:
    return slurm.null_time_min if null and slurm.null_time_min else slurm.time_min


def submit(sweep: Sweep, task_ids: list[str], executor: str = "auto") -> list[dict]:
    """Submit ``task_ids`` (SLURM arrays split to the cluster's MaxArraySize; local processes; or in-process).

    Each submission is recorded in ``jobs.json`` as soon as the scheduler has
    it, with Ctrl-C held back meanwhile, so stopping ``awenc sweep`` loses no task.
    """
    from dist_awenc.launch.jobs import SweepJob

    kind = resolve_executor(executor)
    s = sweep.config.slurm
    order = {tid: i for i, tid in enumerate(sweep.tasks)}
    ids = sorted(set(task_ids), key=order.__getitem__)
    if not ids:
        return []
    for tid in ids:  # a resubmitted task starts without its old error
        sweep.error_path(tid).unlink(missing_ok=True)
    null = [i for i in ids if sweep.tasks[i].kind == "null"]
    rob = [i for i in ids if sweep.tasks[i].kind != "null"]
    name = f"awenc-{sweep.root.name}"
    records = []
    if kind == "debug":
        ex = make_executor("debug", sweep.logs, s, name=name)
        job = ex.submit(SweepJob(), str(sweep.root), ids)
        rec = {"time": time.time(), "executor": kind, "jobs": {str(job.job_id): ids}}
        sweep.record(rec)
        job.exception()  # runs the job here; failures are in errors/<id>.json (result() would open pdb)
        return [rec]
    if kind == "local":
        # the local executor starts every job at once: array_parallelism processes share the tasks
        per_job = s.tasks_per_job
        groups = [(chunk, math.ceil(len(chunk) / per_job) * max(_time_limit(s, sweep.tasks[c].kind == "null") for c in chunk))
                  for chunk in balanced(null + rob, s.array_parallelism)]
        for chunk, minutes in groups:
            ex = make_executor("local", sweep.logs, s, name=name, time_min=minutes)
            with deferred_interrupts(), submission_errors("the local executor"):
                job = ex.submit(SweepJob(), str(sweep.root), chunk)
                rec = {"time": time.time(), "executor": kind, "jobs": {str(job.job_id): chunk}}
                sweep.record(rec)
            records.append(rec)
        return records
    limit = s.max_array_size or max_array_size()
    for group, minutes in ((split(null, 1), _time_limit(s, True)), (split(rob, s.tasks_per_job), _time_limit(s, False))):
        if not group:
            continue
        ex = make_executor("slurm", sweep.logs, s, name=name, time_min=minutes)
        for piece in split(group, limit):
            with deferred_interrupts(), submission_errors("sbatch"):
                jobs = ex.map_array(SweepJob(), [str(sweep.root)] * len(piece), piece)
                rec = {"time": time.time(), "executor": kind, "array": str(jobs[0].job_id).split("_")[0],
                       "jobs": {str(j.job_id): chunk for j, chunk in zip(jobs, piece)}}
                sweep.record(rec)
            records.append(rec)
    return records
