"""The scheduler side of ``awenc sweep`` and ``awenc submit``: submitit executors, SLURM limits, job states.

Nothing here imports torch (nor submitit, until a job is submitted): the job
callables (:mod:`dist_awenc.launch.jobs`) import this module inside SLURM jobs
before their signal handlers are set, and ``awenc sweep status`` reads a sweep
folder through it.

Executors (``--executor``):
    slurm  submitit's SlurmExecutor (sbatch job arrays, requeue on timeout/preemption)
    local  submitit's LocalExecutor (one process per job on this machine, same checkpoint/requeue protocol)
    debug  submitit's DebugExecutor (in this process, one job after another; for debugging)
    auto   slurm where a SLURM controller answers, else local
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
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
    """SLURM state of each job (``123`` or ``123_4``) that slurmctld still knows; {} where it does not answer."""
    bases = sorted({j.split("_")[0] for j in job_ids if j})
    if not bases:
        return {}
    out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(bases)])
    if out is None:  # squeue fails on a list with a purged id: ask one by one
        out = "".join(_run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", b]) or "" for b in bases)
    states = {}
    for line in out.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid:
            states[jid] = state.split()[0] if state else "UNKNOWN"
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


def submitit_outcome(folder: Path, job_id: str) -> Optional[tuple[str, str]]:
    """``("success"|"error", text)`` from the result pickle submitit writes when a job ends, if any.

    The pickle holds ``(status, result-or-traceback)``; only plain tuples of
    strings are read back (``dist_awenc`` jobs return JSON-able dicts).
    """
    path = folder / job_id / f"{job_id}_0_result.pkl"
    if not path.exists():
        return None
    try:
        import cloudpickle  # submitit depends on it

        status, value = cloudpickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - a truncated pickle is no outcome
        return None
    return str(status), value if isinstance(value, str) else json.dumps(value, default=str)


def durable_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically and durably: a temporary file beside ``path``, fsync, rename, fsync the folder.

    After a crash (a node going down, a job killed) ``path`` holds the old
    text or the new, never an empty or partial file. torch-free, for the sweep's
    bookkeeping files (jobs.json, errors/, summary.json ...).
    """
    path = Path(path)
    # unique across the nodes sharing the folder (a PID alone is not), created exclusively, umask permissions
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


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
    if slurm.setup:
        params["setup"] = list(slurm.setup)
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
