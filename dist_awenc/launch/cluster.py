"""The scheduler side of ``awenc sweep`` and ``awenc submit``: submitit executors, SLURM limits, job states.

Nothing here imports torch (nor submitit, until a job is submitted): the job
callables (:mod:`dist_awenc.launch.jobs`) import this module inside SLURM jobs
before their signal handlers are set, and ``awenc sweep status`` reads a sweep
folder through it.

Job outcomes are read from text only: the files the tasks write, ``squeue``/``sacct``
states and the job's stderr log. submitit's ``*_result.pkl`` files are never
unpickled: whoever can write a shared sweep folder could run code in the reader.

Executors (``--executor``):
    slurm  submitit's SlurmExecutor (sbatch job arrays, requeue on timeout/preemption)
    local  submitit's LocalExecutor (one process per job on this machine, same checkpoint/requeue protocol)
    debug  submitit's DebugExecutor (in this process, one job after another; for debugging)
    auto   slurm where a SLURM controller answers, else local
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from dist_awenc.errors import AwencError, ConfigError

EXECUTORS = ("auto", "slurm", "local", "debug")
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize

# squeue states of a job that is not over yet
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED",
            "SPECIAL_EXIT", "STOPPED", "RESIZING", "SIGNALING"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT"}
# task and job ids read from a sweep folder become file names: letters, digits and _ . + - only, no '..'
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_LOG_TAIL = 256 * 1024  # bytes of a job's stderr log read back (progress bars make logs long)


@dataclass
class SlurmSection:
    """Resources of one job (one array element, or one multi-node stage job).

    ``array_parallelism`` also caps the processes the local executor runs at once.
    """

    partition: str = ""  # "": the cluster's default partition
    time_min: int = 60  # time limit of one job; at the limit it checkpoints and requeues
    null_time_min: int = 0  # time limit of null-population pre-training jobs; 0: time_min
    gpus_per_task: int = 0
    cpus_per_task: int = 1  # also the torch threads of a task
    mem_gb: float = 4.0
    array_parallelism: int = 16  # array elements running at once
    tasks_per_job: int = 1  # grid tasks one array element runs one after another (amortises start-up)
    max_array_size: int = 0  # 0: the cluster's MaxArraySize (scontrol show config); arrays are split to fit
    signal_delay_s: int = 90  # USR2 this long before the limit (up to 30 s earlier): checkpoint + requeue
    max_requeues: int = 3  # requeues after a timeout (preemptions do not count)
    account: str = ""
    qos: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines before each job (module load, source venv)
    additional: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. {constraint: a100}

    def __post_init__(self) -> None:
        for name in ("time_min", "cpus_per_task", "array_parallelism", "tasks_per_job"):
            if getattr(self, name) < 1:
                raise ValueError(f"slurm.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("null_time_min", "gpus_per_task", "max_array_size", "signal_delay_s", "max_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"slurm.{name} must be >= 0, got {getattr(self, name)}")
        if self.mem_gb <= 0:
            raise ValueError(f"slurm.mem_gb must be > 0, got {self.mem_gb}")


# ------------------------------------------------------------------ the cluster


def _run(cmd: list[str], timeout: float = 20.0) -> Optional[str]:
    """stdout of ``cmd``, or None where it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_available() -> bool:
    """True where ``sbatch``/``srun`` exist and a SLURM controller answers."""
    tools = shutil.which("srun") is not None and shutil.which("sbatch") is not None
    return tools and _run(["sinfo", "-h", "-o", "%P"], 10) is not None


def resolve_executor(kind: str) -> str:
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor '{kind}'; valid: {', '.join(EXECUTORS)}")
    if kind == "auto":
        return "slurm" if slurm_available() else "local"
    if kind == "slurm" and not slurm_available():
        raise ConfigError("--executor slurm: no SLURM controller answers (sinfo failed); use --executor local, "
                          "or start one (scripts/slurm_local.sh start)")
    return kind


def parse_max_array_size(config_text: str) -> int:
    """Elements one array may hold, from ``scontrol show config``: MaxArraySize and max_array_tasks."""
    limit = DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config_text, re.M)
    if m:
        limit = int(m.group(1))
    m = re.search(r"^SchedulerParameters\s*=.*\bmax_array_tasks=(\d+)", config_text, re.M)
    if m:
        limit = min(limit, int(m.group(1)))
    return limit


def max_array_size() -> int:
    """The cluster's limit on array elements (SLURM's default where ``scontrol`` does not answer)."""
    text = _run(["scontrol", "show", "config"])
    return parse_max_array_size(text) if text else DEFAULT_MAX_ARRAY_SIZE


def split(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive pieces of at most ``size`` items."""
    if size < 1:
        raise ConfigError(f"array size must be >= 1, got {size} (is MaxArraySize 0, arrays disabled?)")
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def balanced(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``min(parts, len)`` consecutive pieces whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (i < r)
        out.append(list(items[start:end]))
        start = end
    return [p for p in out if p]


def scheduler_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM state of each job (``123`` or ``123_4``) that slurmctld or the accounting still knows.

    ``squeue`` first (jobs queued, running or recently ended), then ``sacct`` for
    those slurmctld has purged (the final state: COMPLETED, FAILED, TIMEOUT,
    OUT_OF_MEMORY, CANCELLED...). {} where neither answers.
    """
    wanted = [j for j in job_ids if j]
    bases = sorted({j.split("_")[0] for j in wanted})
    if not bases:
        return {}
    out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(bases)])
    if out is None:  # squeue fails on a list with a purged id: ask one by one
        out = "".join(_run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", b]) or "" for b in bases)
    states = _parse_states(out)
    gone = sorted({j.split("_")[0] for j in wanted if j not in states})
    if gone:
        states = {**_parse_states(_run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(gone)]) or ""),
                  **states}
    return states


def _parse_states(text: str) -> dict[str, str]:
    """``id|STATE`` lines (squeue -o %i|%T, sacct -P -o JobID,State) as {id: STATE}; pending array ranges skipped."""
    states = {}
    for line in text.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid and "[" not in jid:
            states[jid] = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 1000" -> CANCELLED
    return states


def classify(state: str) -> str:
    """A SLURM state as pending / running / over."""
    state = state.upper().rstrip("+")
    if state in _PENDING:
        return "pending"
    if state in _RUNNING:
        return "running"
    return "over"


def process_alive(pid: int) -> bool:
    """A local job's controller process runs (a zombie is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True


def checked_id(value: Any, what: str, where: Any) -> str:
    """``value`` as a task or job id that is safe as a file name, else a ConfigError naming ``where``."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise ConfigError(f"{where}: {what} {value!r} is not a valid id (letters, digits, '_', '.', '+', '-'; "
                          f"no path separators or '..')")
    return value


def submitit_outcome(folder: Path, job_id: str) -> Optional[tuple[str, str]]:
    """``("success"|"error", text)`` of an ended job, from the stderr log submitit's job process writes, if any.

    Reads text only (``<folder>/<job>/<job>_<task>_log.err``): the marker lines
    submitit logs when the job returns or raises, and the exception line of the
    traceback that follows. The result pickle beside it is never opened.
    """
    if not _SAFE_ID.match(job_id) or ".." in job_id:
        return None
    d = folder / job_id
    logs = sorted(d.glob(f"{job_id}_*_log.err"), key=lambda p: (len(p.name), p.name)) if d.is_dir() else []
    success = None
    for log in logs:  # every node's log of a multi-node job: the first that failed names the error
        outcome = _log_outcome(_tail(log))
        if outcome and outcome[0] == "error":
            return outcome
        success = success or outcome
    return success


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - _LOG_TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _log_outcome(text: str) -> Optional[tuple[str, str]]:
    lines = text.replace("\r", "\n").splitlines()
    failed = max((i for i, ln in enumerate(lines) if "Submitted job triggered an exception" in ln), default=-1)
    done = max((i for i, ln in enumerate(lines) if "Job completed successfully" in ln), default=-1)
    if failed < 0 and done < 0:
        return None
    if done > failed:  # a requeued job's log holds the earlier attempts too: the last word counts
        return "success", ""
    tail = lines[failed:]
    starts = [i for i, ln in enumerate(tail) if ln.startswith("Traceback (most recent call last)")]
    if starts:  # Python's traceback: indented frames, then "Type: message"
        for ln in tail[starts[-1] + 1:]:
            if ln.strip() and not ln[0].isspace():
                return "error", ln.strip()
    return "error", tail[0].strip()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock (flock) on ``<path>.lock`` while the block runs: one read-modify-write of ``path`` at a time."""
    import fcntl

    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # umask applies: a group sharing the folder shares the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ executors


def make_executor(kind: str, folder: Path, slurm: SlurmSection, *, name: str, time_min: Optional[int] = None,
                  nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: Optional[int] = None) -> Any:
    """A submitit executor writing its scripts, pickles and logs under ``folder/<job id>/``."""
    folder.mkdir(parents=True, exist_ok=True)
    where = str(folder / "%j")
    try:
        return _make_executor(kind, where, slurm, name=name, time_min=time_min, nodes=nodes,
                              tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node)
    finally:
        try:  # some executors create the literal "%j" folder
            (folder / "%j").rmdir()
        except OSError:
            pass


def _make_executor(kind: str, where: str, slurm: SlurmSection, *, name: str, time_min: Optional[int], nodes: int,
                   tasks_per_node: int, gpus_per_node: Optional[int]) -> Any:
    try:
        import submitit
    except ImportError:
        raise AwencError("submitting jobs needs submitit: pip install 'dist_awenc[slurm]'") from None

    gpus = slurm.gpus_per_task if gpus_per_node is None else gpus_per_node
    if kind == "debug":
        return submitit.DebugExecutor(folder=where)
    if kind == "local":
        ex = submitit.LocalExecutor(folder=where, max_num_timeout=slurm.max_requeues)
        ex.update_parameters(timeout_min=int(time_min or slurm.time_min), gpus_per_node=gpus, tasks_per_node=tasks_per_node,
                             nodes=1, signal_delay_s=slurm.signal_delay_s,
                             **({"setup": list(slurm.setup)} if slurm.setup else {}))
        return ex
    if kind != "slurm":
        raise ConfigError(f"unknown executor '{kind}'; valid: {', '.join(EXECUTORS)}")
    ex = submitit.SlurmExecutor(folder=where, max_num_timeout=slurm.max_requeues)
    params: dict[str, Any] = dict(
        job_name=name, time=int(time_min or slurm.time_min), nodes=nodes, ntasks_per_node=tasks_per_node,
        cpus_per_task=slurm.cpus_per_task, mem=f"{int(round(slurm.mem_gb * 1024))}MB",
        array_parallelism=slurm.array_parallelism, signal_delay_s=slurm.signal_delay_s,
        additional_parameters=dict(slurm.additional),
    )
    if gpus:
        params["gpus_per_node"] = gpus  # no --gpus-per-node=0 line: some clusters reject it
    for key in ("partition", "account", "qos"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    # from Slurm 22.05 srun no longer inherits --cpus-per-task: without this the job's step (and its data loader)
    # would run on one CPU per task
    params["setup"] = ["export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}", *slurm.setup]
    ex.update_parameters(**params)
    return ex


@contextmanager
def submission_errors(what: str = "sbatch") -> Iterator[None]:
    """A refused submission (bad partition, too much memory, ...) as one line naming the scheduler's reason."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        yield
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError, OSError) as e:
        text = (getattr(e, "stderr", None) or str(e) or type(e).__name__)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise AwencError(f"{what} refused the job: {last_error_line(text) or type(e).__name__}") from None


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM while a submission is made and recorded (main thread only)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (ValueError, OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
