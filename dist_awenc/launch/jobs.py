"""The callables submitit runs inside SLURM (or local) jobs.

They receive paths and names only: the sweep folder and task ids, or a stage
and its config file. Everything large is read from those paths inside the job,
so the pickle submitit writes stays a few hundred bytes.

Both are checkpointable in submitit's sense: at a timeout or preemption
submitit calls ``checkpoint()`` from its USR2 handler, pickles the
:class:`~submitit.helpers.DelayedSubmission` it returns and requeues the job;
the requeued job resumes from what the files say is done (finished task files,
the training loop's last checkpoint).

This module imports neither torch nor the rest of dist_awenc at import time,
so submitit installs its signal handlers within a second of the job's start.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional


class SweepJob:
    """Run some tasks of a sweep: ``SweepJob()(sweep_dir, task_ids)``."""

    def __call__(self, sweep_dir: str, task_ids: list[str]) -> dict[str, Any]:
        from dist_awenc.launch.sweep.job import SweepTaskError, record_job_failure, run_tasks

        try:
            return run_tasks(Path(sweep_dir), list(task_ids))
        except SweepTaskError:  # each failed task wrote its errors/<id>.json
            raise
        except Exception as e:
            # failed outside its tasks (loading the sweep, importing torch...): the tasks' error files say so, which
            # is how `awenc sweep status` learns a job's outcome (it never reads submitit's result pickle)
            record_job_failure(sweep_dir, list(task_ids), e)
            raise

    def checkpoint(self, sweep_dir: str, task_ids: list[str]) -> Any:
        """Requeue with the same tasks: the requeued job skips those with a result, and a pre-training
        task resumes from its last checkpoint. (This runs inside submitit's signal handler, possibly in the
        middle of an import: it must not import anything heavy.)"""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SweepJob(), sweep_dir, list(task_ids))


class StageJob:
    """One node's share of a stage run: ``accelerate launch -m dist_awenc <stage> ...`` (rank and peers from SLURM).

    Submitted with one task per node; every node runs one ``accelerate launch``
    that starts ``processes_per_node`` processes. A requeued job runs the same
    command, and the stage resumes its run folder from the last checkpoint.
    """

    def __init__(self, stage: str, config: Optional[str], overrides: list[str], processes_per_node: int,
                 gpus: bool, mixed_precision: str = "no", port: int = 0, accelerate_config: Optional[str] = None,
                 run_dir: Optional[str] = None) -> None:
        self.stage, self.config, self.overrides = stage, config, list(overrides)
        self.processes_per_node, self.gpus, self.mixed_precision = processes_per_node, gpus, mixed_precision
        self.port, self.accelerate_config, self.run_dir = port, accelerate_config, run_dir

    def finished(self) -> bool:
        """The run folder says complete (a requeue that raced with the end of the run has nothing to do)."""
        if not self.run_dir:
            return False
        try:
            return json.loads((Path(self.run_dir) / "status.json").read_text()).get("state") == "complete"
        except (OSError, ValueError):
            return False

    def command(self, num_nodes: int, node_rank: int, main_host: str) -> tuple[list[str], dict[str, str]]:
        """The ``accelerate launch`` command line of one node, and the environment it adds."""
        total = num_nodes * self.processes_per_node
        # 0: a port per job, so two jobs sharing a node do not collide
        port = self.port or 29500 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 1000
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.accelerate_config:
            cmd += ["--config_file", self.accelerate_config]
        env = {}
        if not self.gpus:
            env["ACCELERATE_USE_CPU"] = "1"  # `--cpu --num_processes N` starts ONE process (TOOLCHAIN.md)
        if total > 1:
            cmd += ["--multi_gpu", "--num_processes", str(total), "--num_machines", str(num_nodes),
                    "--machine_rank", str(node_rank), "--main_process_ip", main_host, "--main_process_port", str(port)]
        else:
            cmd += ["--num_processes", "1", "--num_machines", "1"] + ([] if self.gpus else ["--cpu"])
        if not self.gpus:  # Accelerate's default (2 threads) oversubscribes small CPU allocations badly
            cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
            cmd += ["--num_cpu_threads_per_process", str(max(1, cpus // self.processes_per_node))]
        cmd += ["--mixed_precision", self.mixed_precision, "--dynamo_backend", "no", "-m", "dist_awenc", self.stage]
        if self.config:
            cmd += ["--config", self.config]
        return cmd + self.overrides, env

    def __call__(self) -> int:
        import submitit

        try:
            job_env = submitit.JobEnvironment()
            nodes, rank, hosts = job_env.num_nodes, job_env.node, list(job_env.hostnames)
        except RuntimeError:  # the debug executor: this process, one node
            nodes, rank, hosts = 1, 0, [socket.gethostname()]
        if self.finished():
            print(f"{self.run_dir} is complete: nothing to run", flush=True)
            return 0
        cmd, extra = self.command(nodes, rank, hosts[0])
        print("+ " + " ".join(f"{k}={v}" for k, v in extra.items()) + " " + shlex.join(cmd), flush=True)
        # the children ignore SLURM's USR2: training goes on (and checkpoints) until the requeue stops the job
        rc = subprocess.call(cmd, env={**os.environ, **extra}, preexec_fn=_ignore_usr2)
        if rc != 0:
            host = hosts[rank] if rank < len(hosts) else "?"
            raise RuntimeError(f"awenc {self.stage} exited with code {rc} on node {rank} ({host})")
        return rc

    def checkpoint(self) -> Any:
        """Requeue the same command: the stage resumes from its run folder's last checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
