"""``awenc submit <stage>``: one long stage run (pre-training, embedding) as one SLURM job of N nodes.

Every node runs one ``accelerate launch -m dist_awenc <stage> ...`` with its
node rank, the first node's host as the rendezvous and ``processes_per_node``
processes (one per GPU); the accelerate config, where given, decides the
engine (:mod:`dist_awenc.launch.node`). At the time limit or a preemption
submitit's USR2 handler stops the training at its next step with a checkpoint
and requeues the job (:meth:`dist_awenc.launch.jobs.StageJob.checkpoint`); the
stage resumes from that checkpoint. The same call
runs the stage through submitit's local executor (one node) where there is no
SLURM. The plain-sbatch equivalent is ``slurm/accelerate_multinode.sbatch``.

Logs and the job record go to ``<run folder>/slurm/``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dist_awenc.config import load_config
from dist_awenc.encoders.io import atomic_write_text
from dist_awenc.errors import ConfigError
from dist_awenc.launch.cluster import (SlurmSection, classify, make_executor, process_alive, resolve_executor,
                                       scheduler_states, submission_errors, submitit_outcome, last_error_line)
from dist_awenc.runs import run_dir_of, status
from dist_awenc.stages import schema

MULTINODE_STAGES = ("pretrain", "embed", "watermark", "downstream")


def submit_stage(stage: str, config: Optional[str] = None, overrides: Optional[list[str]] = None, *,
                 executor: str = "auto", nodes: int = 1, gpus_per_node: int = 0, processes_per_node: Optional[int] = None,
                 slurm: Optional[SlurmSection] = None, mixed_precision: Optional[str] = None,
                 accelerate_config: Optional[str] = None,
                 port: int = 0, out=None) -> dict[str, Any]:
    """Submit ``awenc <stage>`` as one job of ``nodes`` nodes; returns the record written to ``<run>/slurm/jobs.json``.

    ``accelerate_config`` (configs/accelerate/) decides the engine (DDP, ZeRO-1, ZeRO-2) and its precision
    (``mixed_precision`` overrides it); without one, several processes run DDP.
    """
    from dist_awenc.launch.jobs import StageJob

    out = out or sys.stdout
    if stage not in MULTINODE_STAGES:
        raise ConfigError(f"awenc submit: stage '{stage}' is not a training stage; valid: {', '.join(MULTINODE_STAGES)}")
    if nodes < 1 or gpus_per_node < 0:
        raise ConfigError("--nodes must be >= 1 and --gpus-per-node >= 0")
    kind = resolve_executor(executor)
    if kind != "slurm" and nodes > 1:
        raise ConfigError(f"--nodes {nodes} needs SLURM; the {kind} executor runs one node")
    overrides = list(overrides or [])
    cfg = load_config(schema(stage), config, overrides)  # fails here, not in the job, on a bad config
    run_dir = run_dir_of(cfg).expanduser().resolve()
    overrides.append(f"run.out_dir={run_dir.parent}")  # the job may start in another directory
    slurm = slurm or SlurmSection()
    procs = processes_per_node or max(1, gpus_per_node)
    job_fn = StageJob(stage, str(Path(config).resolve()) if config else None, overrides, procs, gpus=gpus_per_node > 0,
                      mixed_precision=mixed_precision, port=port,
                      accelerate_config=str(Path(accelerate_config).resolve()) if accelerate_config else None,
                      run_dir=str(run_dir), stop_timeout_s=max(10, slurm.signal_delay_s - 20))
    command = job_fn.command(nodes, 0, "<first node>")[0]  # a bad accelerate config fails here, before sbatch
    logs = run_dir / "slurm"
    ex = make_executor(kind, logs, slurm, name=f"awenc-{stage}-{cfg.run.name}", nodes=nodes, tasks_per_node=1,
                       gpus_per_node=gpus_per_node)
    with submission_errors("sbatch" if kind == "slurm" else f"the {kind} executor"):
        job = ex.submit(job_fn)
    rec = {"time": time.time(), "executor": kind, "job": str(job.job_id), "stage": stage, "run_dir": str(run_dir), "nodes": nodes,
           "processes_per_node": procs, "command": command}
    subs = json.loads((logs / "jobs.json").read_text())["submissions"] if (logs / "jobs.json").exists() else []
    atomic_write_text(logs / "jobs.json", json.dumps({"submissions": subs + [rec]}, indent=1))
    print(f"awenc submit: {stage} as {kind} job {job.job_id} ({nodes} node(s) x {procs} process(es)) -> {run_dir}",
          file=out, flush=True)
    if kind == "debug":
        job.result()
    return rec


def stage_state(run_dir: str | Path) -> dict[str, str]:
    """The last submitted job of a run folder: {"state": done|running|pending|failed|missing, "job", "error"}."""
    run_dir = Path(run_dir)
    if status(run_dir).get("state") == "complete":
        return {"state": "done", "job": "", "error": ""}
    p = run_dir / "slurm" / "jobs.json"
    if not p.exists():
        return {"state": "missing", "job": "", "error": ""}
    rec = json.loads(p.read_text())["submissions"][-1]
    job, kind = rec["job"], rec["executor"]
    if kind == "slurm":
        state = scheduler_states([job]).get(job)
        if state and classify(state) != "over":
            return {"state": classify(state), "job": job, "error": ""}
    elif kind == "local" and job.isdigit() and process_alive(int(job)):
        return {"state": "running", "job": job, "error": ""}
    outcome = submitit_outcome(run_dir / "slurm", job)
    if outcome and outcome[0] == "success" and status(run_dir).get("state") == "complete":
        return {"state": "done", "job": job, "error": ""}
    if outcome and outcome[0] == "error":
        err = last_error_line(outcome[1])
    else:
        err = status(run_dir).get("error", "ended without finishing")
    return {"state": "failed", "job": job, "error": err}


def wait_stage(run_dir: str | Path, poll_s: float = 5.0, timeout_s: Optional[float] = None) -> dict[str, str]:
    start = time.time()
    while True:
        st = stage_state(run_dir)
        if st["state"] not in ("running", "pending"):
            return st
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"{run_dir}: job {st['job']} still {st['state']}")
        time.sleep(poll_s)
