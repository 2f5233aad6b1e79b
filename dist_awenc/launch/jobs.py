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
import time
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

    Submitted with one task per node; every node runs the command of
    :func:`dist_awenc.launch.node.launch_command` (the launcher config, where given, decides the engine), which
    starts ``processes_per_node`` processes. At the time limit or a preemption submitit calls :meth:`checkpoint` on
    node 0: it asks the training to stop (SIGUSR1 to every process below this one; one rank is enough, all stop at
    the same step), waits up to ``stop_timeout_s`` for the checkpoint, and requeues; the requeued job runs the same
    command, and the stage resumes its run folder from that checkpoint.
    """

    def __init__(self, stage: str, config: Optional[str], overrides: list[str], processes_per_node: int,
                 gpus: bool, mixed_precision: Optional[str] = None, port: int = 0, accelerate_config: Optional[str] = None,
                 run_dir: Optional[str] = None, stop_timeout_s: float = 60.0) -> None:
        self.stage, self.config, self.overrides = stage, config, list(overrides)
        self.processes_per_node, self.gpus, self.mixed_precision = processes_per_node, gpus, mixed_precision
        self.port, self.accelerate_config, self.run_dir = port, accelerate_config, run_dir
        self.stop_timeout_s = stop_timeout_s

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
        from dist_awenc.launch.node import launch_command

        # 0: a port per job, so two jobs sharing a node do not collide
        port = self.port or 29500 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 1000
        stage_args = [self.stage] + (["--config", self.config] if self.config else []) + self.overrides
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or None
        return launch_command(stage_args, num_machines=num_nodes, machine_rank=node_rank,
                              processes_per_node=self.processes_per_node, main_host=main_host, main_port=port,
                              gpus=self.processes_per_node if self.gpus else 0, cpus=cpus,
                              accelerate_config=self.accelerate_config, mixed_precision=self.mixed_precision)

    def mark(self) -> Path:
        """The file the training's main process writes when it stopped for a requeue (a shared run folder)."""
        where = Path(self.run_dir) / "slurm" if self.run_dir else Path.cwd()
        return where / f".requeue-{os.environ.get('SLURM_JOB_ID', os.getpid())}"

    def __call__(self) -> int:
        import submitit

        from dist_awenc.launch.node import MARK_ENV, launcher_signals

        try:
            job_env = submitit.JobEnvironment()
            nodes, rank, hosts = job_env.num_nodes, job_env.node, list(job_env.hostnames)
        except RuntimeError:  # the debug executor: this process, one node
            nodes, rank, hosts = 1, 0, [socket.gethostname()]
        if self.finished():
            print(f"{self.run_dir} is complete: nothing to run", flush=True)
            return 0
        cmd, extra = self.command(nodes, rank, hosts[0])
        mark = self.mark()
        if rank == 0:
            mark.unlink(missing_ok=True)
        print("+ " + " ".join(f"{k}={v}" for k, v in extra.items()) + " " + shlex.join(cmd), flush=True)
        # the launcher ignores SIGUSR1/SIGUSR2 (SLURM signals every process of the step); the training handles them
        proc = subprocess.Popen(cmd, env={**os.environ, **extra, MARK_ENV: str(mark)}, preexec_fn=launcher_signals)
        _CHILD[:] = [proc.pid]
        rc = proc.wait()
        _CHILD.clear()
        if mark.exists():  # stopped for a requeue: submitit's handler (node 0) or SLURM's preemption requeues the job
            print(f"awenc {self.stage} saved a checkpoint at step {mark.read_text().strip()} and stopped; waiting for the "
                  "requeue", flush=True)
            time.sleep(max(600.0, 2 * self.stop_timeout_s))
            raise RuntimeError(f"awenc {self.stage} stopped for a requeue that never came: run the same `awenc submit` "
                               "to resume from its checkpoint")
        if rc != 0:
            host = hosts[rank] if rank < len(hosts) else "?"
            raise RuntimeError(f"awenc {self.stage} exited with code {rc} on node {rank} ({host})")
        return rc

    def checkpoint(self) -> Any:
        """Stop the training at its next step with a checkpoint (waiting up to ``stop_timeout_s``), then requeue the
        same command: the stage resumes from that checkpoint. (Runs in submitit's USR2 handler on node 0.)"""
        from submitit.helpers import DelayedSubmission

        from dist_awenc.launch.cluster import process_alive
        from dist_awenc.launch.node import RESEND_S, signal_tree

        if _CHILD:
            pid, deadline, sent = _CHILD[0], time.monotonic() + self.stop_timeout_s, 0.0
            while process_alive(pid) and time.monotonic() < deadline:
                if time.monotonic() - sent > RESEND_S:  # again for a rank still starting (it ignores the signal)
                    signal_tree(pid, signal.SIGUSR1)
                    sent = time.monotonic()
                time.sleep(0.2)
        return DelayedSubmission(self)


_CHILD: list[int] = []  # the pid of the running launch (module state: a StageJob is pickled by its checkpoint)
