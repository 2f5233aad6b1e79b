"""Stop a training run cleanly on the scheduler's preemption signal, so that a requeued job loses no step.

SLURM warns a job before its time limit or a preemption: ``#SBATCH --signal=B:USR1@300`` signals the batch shell,
which forwards SIGUSR1 to the training (slurm/accelerate_multinode.sbatch); submitit sends SIGUSR2
(:meth:`dist_awenc.launch.jobs.StageJob.checkpoint` forwards it); a preemption sends SIGTERM. A :class:`Stopper`
turns SIGUSR1 and SIGUSR2 (and, inside a SLURM job, SIGTERM) into a request; at each step boundary the training loop
asks every rank (:class:`~dist_awenc.engine.dist.AnyRank`: one rank's signal is enough, and all ranks stop at the
same step), saves a checkpoint there, leaves the requeue mark and raises :class:`Preempted`; the CLI exits with
:data:`REQUEUE_EXIT`. The requeued run resumes from that checkpoint bit for bit.

A handler is installed only where nobody else's is (the default or the ignored disposition): submitit's own USR2
and TERM handlers in a sweep job stay submitit's. SIGTERM outside SLURM keeps its default meaning (stop now).

No torch at import: the CLI imports :class:`Preempted` to map it to its exit status.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped for a requeue; running the same command again resumes the run
MARK_ENV = "AWENC_REQUEUE_MARK"  # a file the main process writes (the step) once every rank saved and stopped
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2")  # + SIGTERM inside a SLURM job (SLURM_JOB_ID set)


class Preempted(Exception):
    """Every rank saved a checkpoint at ``step`` and stopped on a preemption signal."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step} on a preemption signal; checkpoint saved: the same command (or the "
                         f"requeued job) resumes from it")
        self.step = step


def stop_signals() -> list[signal.Signals]:
    names = list(STOP_SIGNALS) + (["SIGTERM"] if os.environ.get("SLURM_JOB_ID") else [])
    return [getattr(signal, n) for n in names]


class Stopper:
    """Listens for the stop signals during a training loop and answers, at each step boundary, whether the ranks
    stop there (every rank must call :meth:`agreed` once per step, then :meth:`close`)."""

    def __init__(self) -> None:
        from dist_awenc.engine.dist import AnyRank

        self.received: Optional[str] = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in stop_signals():
            try:
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.SIG_IGN, None):
                    self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers (the launcher's processes always are)
                break
        self._any = AnyRank()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether some rank received a stop signal (all ranks get the same answer at the same step)."""
        return self._any.poll(self.received is not None)

    def stopped(self, step: int, is_main: bool, barrier) -> Preempted:
        """After the checkpoint of ``step``: the main process leaves the requeue mark (``$AWENC_REQUEUE_MARK``), every
        rank waits for it (a launcher sees the mark as soon as any rank has exited), and the listening ends."""
        if is_main and os.environ.get(MARK_ENV):
            mark = Path(os.environ[MARK_ENV])
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(f"{step}\n")
        barrier()
        self.close()
        return Preempted(step)

    def close(self) -> None:
        self._any.close()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
