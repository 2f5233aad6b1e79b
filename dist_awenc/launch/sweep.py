"""``awenc sweep``: the robustness grid and the null population as SLURM job arrays (submitit).

    awenc sweep run     --config configs/sweep/<name>.yaml [key=value ...] [--executor slurm|local|debug] [--wait]
    awenc sweep status  --config ... | --dir runs/<name>
    awenc sweep collect --config ... | --dir runs/<name>
    awenc sweep resume  --config ... | --dir runs/<name> [--executor ...] [--wait]

A task is one robustness :class:`~dist_awenc.launch.robustness.Task` of one
watermarked encoder (a *target*): attack x strength x seed, verified in every
mode (the modes share the attacked encoder and the pirate's head, the costly
part), or one null-population encoder to pre-train for ``awenc calibrate``.
Jobs receive the sweep folder's path and task ids only; they read everything
else from the folder. Each task writes its own result file atomically; a
failing task writes ``errors/<id>.json`` from inside the job. Jobs are
checkpointable: at a timeout or preemption they requeue with the tasks that
have no result yet, and a pre-training task resumes from its last checkpoint.

The sweep folder (``<run.out_dir>/<run.name>/``)::

    config.yaml            the resolved sweep config (absolute paths); jobs read this, not the caller's file
    sweep.json             the expanded task list
    null.yaml              the null population's calibrate config, as written (relative to sweep.json's cwd)
    jobs.json              every submission (executor, job ids, each job's task ids), written right after it
    targets/<t>/tasks/<task>.json            robustness results (robustness.run_task)
    targets/<t>/robustness.{csv,json,png}    per-target collection, the same files `awenc robustness` writes
    null/<name>.json       a finished null encoder (its path; the run folder is the calibration's population/)
    errors/<id>.json       the error of a failed task
    logs/<job id>/         submitit's sbatch scripts, pickles and stdout/stderr
    sweep.csv, sweep.parquet, failures.json, summary.json    written by `collect`

Without SLURM the same folder is filled through submitit's local executor
(``array_parallelism`` processes at once) or, with ``--executor debug``, in
this process.

``status`` and ``collect`` read the folder without importing torch or
submitit: this module imports them (and the config schemas, which import
torch) only inside the functions that submit or run tasks, and
:class:`SweepConfig` is defined on first use. Task states come from the files
the tasks write (results, ``errors/<id>.json``), ``squeue``/``sacct`` and the
jobs' stderr logs; submitit's result pickles are never read. Task and job ids
read from the folder are checked before they become paths.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import re
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Optional

from dist_awenc.errors import AwencError, ConfigError
from dist_awenc.launch.cluster import (SlurmSection, balanced, checked_id, classify, deferred_interrupts,
                                       last_error_line, locked, make_executor, max_array_size,
                                       process_alive, resolve_executor, scheduler_states, split, submission_errors,
                                       submitit_outcome)
from dist_awenc.files import atomic_path, atomic_write_text

# Heavy modules (torch through the config sections, the attack registry and the robustness grid) are imported
# inside the functions that need them, so `awenc sweep status` / `collect` start in a fraction of a second.

SWEEP_FORMAT = "dist_awenc.sweep/1"
MAIN_TARGET = "main"
FAIL_ENV = "AWENC_SWEEP_FAIL"  # comma-separated task-id patterns that raise on purpose (rehearsing failures)
STATES = ("done", "running", "pending", "failed", "missing", "unknown")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
DEFAULT_NAME = "sweep"  # run.name of a sweep config that names none
# SweepConfig's top-level keys, in order (checked against the class when it is defined): `status --config` and
# `collect --config` read only `run` from a config file, without the schema (see folder_of_config)
SECTIONS = ("run", "encoder", "secret", "encoders", "secrets", "data", "grid", "options", "probe", "verify",
            "null_population", "null_overrides", "slurm")


def _define_sweep_config() -> type:
    """The schema of a sweep config; defined on first use, as its sections import torch."""
    from dist_awenc.attacks.base import AttackOptions
    from dist_awenc.config import DataSection, ProbeSection, RunSection, VerifySection
    from dist_awenc.launch.robustness import GridSection

    # the annotations below are strings (PEP 563): OmegaConf resolves them in this module's namespace
    globals().update(AttackOptions=AttackOptions, DataSection=DataSection, ProbeSection=ProbeSection,
                     RunSection=RunSection, VerifySection=VerifySection, GridSection=GridSection)

    @dataclass
    class SweepConfig:
        """The robustness grid of ``awenc robustness`` for one or more watermarked encoders, plus a null population."""

        run: RunSection = field(default_factory=lambda: RunSection(name=DEFAULT_NAME))
        encoder: str = ""  # the watermarked encoder (target "main"); "" and no `encoders`: only the null population
        secret: str = ""
        encoders: dict[str, str] = field(default_factory=dict)  # more targets: name -> watermarked encoder
        secrets: dict[str, str] = field(default_factory=dict)  # name -> that encoder's secret
        data: DataSection = field(default_factory=DataSection)
        grid: GridSection = field(default_factory=GridSection)
        options: AttackOptions = field(default_factory=AttackOptions)
        probe: ProbeSection = field(default_factory=ProbeSection)
        verify: VerifySection = field(default_factory=VerifySection)
        null_population: str = ""  # a calibrate config (YAML): its population's encoders are pre-trained as tasks
        null_overrides: list[str] = field(default_factory=list)  # dotted overrides of that config
        slurm: SlurmSection = field(default_factory=SlurmSection)

    SweepConfig.__qualname__ = "SweepConfig"
    names = tuple(f.name for f in fields(SweepConfig))
    assert names == SECTIONS, f"update sweep.SECTIONS to SweepConfig's fields: {names}"
    globals()["SweepConfig"] = SweepConfig
    return SweepConfig


def _schema() -> type:
    return globals().get("SweepConfig") or _define_sweep_config()


def __getattr__(name: str) -> Any:  # PEP 562: `sweep.SweepConfig` defines the schema on first access
    if name == "SweepConfig":
        return _schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SweepTask:
    kind: str  # "robustness" | "null"
    target: str = ""  # robustness: the watermarked encoder's name
    attack: str = ""
    strength: float = 0.0
    seed: int = 0
    name: str = ""  # null: the null encoder's run name

    @property
    def id(self) -> str:
        return f"null.{self.name}" if self.kind == "null" else f"{self.target}.{self.robustness.id}"

    @property
    def robustness(self) -> Any:
        """The :class:`~dist_awenc.launch.robustness.Task` of a robustness task."""
        from dist_awenc.launch.robustness import Task

        return Task(self.attack, self.strength, self.seed)


@dataclass
class TaskState:
    id: str
    state: str  # one of STATES
    job: str = ""
    error: str = ""


class SweepTaskError(RuntimeError):
    """Some tasks of a job failed (each wrote errors/<id>.json); the others finished."""


# ------------------------------------------------------------------ the plan


def targets_of(cfg: SweepConfig) -> dict[str, tuple[str, str]]:
    """Target name -> (watermarked encoder, secret)."""
    out: dict[str, tuple[str, str]] = {}
    if cfg.encoder or cfg.secret:
        if not (cfg.encoder and cfg.secret):
            raise ConfigError("give both `encoder` and `secret` (the watermarked encoder and its secret)")
        out[MAIN_TARGET] = (cfg.encoder, cfg.secret)
    if set(cfg.encoders) != set(cfg.secrets):
        odd = sorted(set(cfg.encoders) ^ set(cfg.secrets))
        raise ConfigError(f"`encoders` and `secrets` must name the same targets; unmatched: {', '.join(odd)}")
    for name in cfg.encoders:
        if not _NAME.match(name) or name in (MAIN_TARGET, "null"):
            raise ConfigError(f"target name '{name}': use letters, digits, '_' and '-' (not 'main' or 'null')")
        out[name] = (cfg.encoders[name], cfg.secrets[name])
    return out


def robustness_config(cfg: SweepConfig, target: str, sweep_dir: Path) -> RobustnessConfig:
    """The ``awenc robustness`` config of one target, whose run folder is ``targets/<target>``."""
    from dist_awenc.config import RunSection
    from dist_awenc.launch.robustness import RobustnessConfig

    encoder, secret = targets_of(cfg)[target]
    return RobustnessConfig(run=RunSection(name=target, out_dir=str(sweep_dir / "targets"), seed=cfg.run.seed),
                            encoder=encoder, secret=secret, data=cfg.data, grid=cfg.grid, options=cfg.options,
                            probe=cfg.probe, verify=cfg.verify)


def null_config(cfg: SweepConfig) -> Optional[CalibrateConfig]:
    """The calibrate config of the null population, as written (relative paths stay relative: the null tasks run
    from the directory the sweep was prepared in, so `awenc calibrate` run there finds the same configs)."""
    if not cfg.null_population:
        return None
    from dist_awenc.config import CalibrateConfig, load_config

    return load_config(CalibrateConfig, cfg.null_population, list(cfg.null_overrides))


def null_pretrain_configs(ccfg: Optional[CalibrateConfig]) -> dict[str, PretrainConfig]:
    """Null encoder run name -> its pre-training config, in the calibration run's ``population/`` folder,
    where ``awenc calibrate`` with the same config reuses them."""
    if ccfg is None:
        return {}
    from dist_awenc.verify.calibrate import null_encoder_configs

    root = Path(ccfg.run.out_dir) / ccfg.run.name / "population"
    return {c.run.name: c for c in null_encoder_configs(ccfg, root)}


def expand(cfg: SweepConfig, null_names: Iterable[str] = ()) -> list[SweepTask]:
    """Every task: the null population first (the longest jobs), then target x attack x strength x seed."""
    from dist_awenc.launch.robustness import expand_grid

    tasks = [SweepTask("null", name=n) for n in null_names]
    grid = expand_grid(cfg.grid)
    for target in targets_of(cfg):
        tasks += [SweepTask("robustness", target=target, attack=t.attack, strength=t.strength, seed=t.seed) for t in grid]
    if not tasks:
        raise ConfigError("the sweep is empty: give `encoder` + `secret` (or `encoders` + `secrets`) and/or `null_population`")
    ids = [t.id for t in tasks]
    for t in tasks:
        check_task(t, t.id, "the sweep config")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"the grid names task '{dup}' twice (repeated seed or strength?)")
    return tasks


def _abs(path: Optional[str]) -> Any:
    return str(Path(path).expanduser().resolve()) if path else path


def resolved(cfg: SweepConfig) -> SweepConfig:
    """Every path absolute, so jobs started in another directory find the same files."""
    run = replace(cfg.run, out_dir=_abs(cfg.run.out_dir))
    data = replace(cfg.data, root=_abs(cfg.data.root), beton=_abs(cfg.data.beton))
    verify = replace(cfg.verify, calibration=_abs(cfg.verify.calibration))
    return replace(cfg, run=run, encoder=_abs(cfg.encoder), secret=_abs(cfg.secret), data=data, verify=verify,
                   encoders={k: _abs(v) for k, v in cfg.encoders.items()}, secrets={k: _abs(v) for k, v in cfg.secrets.items()},
                   null_population=_abs(cfg.null_population))


def sweep_dir_of(cfg: SweepConfig) -> Path:
    return Path(cfg.run.out_dir).expanduser().resolve() / cfg.run.name


def _without_slurm(cfg: SweepConfig) -> str:
    from dist_awenc.config import to_yaml

    return to_yaml(replace(cfg, slurm=SlurmSection()))


def prepare(cfg: SweepConfig) -> Path:
    """Create (or check and reuse) the sweep folder of ``cfg``: config.yaml, null.yaml, sweep.json.

    The ``slurm`` section may change between runs of the same sweep (new
    limits apply to new submissions); anything else must stay the same.

    Raises:
        ConfigError: missing inputs, an empty grid, or a folder that holds a sweep with another grid.
    """
    from dist_awenc.config import load_config, to_yaml

    cfg = resolved(cfg)
    for target, (encoder, secret) in targets_of(cfg).items():
        for what, path in (("encoder", encoder), ("secret", secret)):
            if not Path(path).exists():
                raise ConfigError(f"target '{target}': {what} '{path}' does not exist")
    ccfg = null_config(cfg)
    tasks = expand(cfg, null_pretrain_configs(ccfg))
    root = sweep_dir_of(cfg)
    old = root / "config.yaml"
    if old.exists():
        prior = load_config(_schema(), old)
        if _without_slurm(prior) != _without_slurm(cfg):
            raise ConfigError(f"sweep folder '{root}' holds a sweep with a different grid or inputs; resume it with the "
                              f"same config (only `slurm.*` may change) or choose another run.name")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(old, to_yaml(cfg))
    if ccfg is not None:
        atomic_write_text(root / "null.yaml", to_yaml(ccfg))
    for target in targets_of(cfg):
        tdir = root / "targets" / target
        (tdir / "tasks").mkdir(parents=True, exist_ok=True)
        # the same folder `awenc robustness --config targets/<t>/config.yaml` would fill, task by task
        atomic_write_text(tdir / "config.yaml", to_yaml(robustness_config(cfg, target, root)))
    plan = {"format": SWEEP_FORMAT, "cwd": os.getcwd(), "tasks": [{"id": t.id, **asdict(t)} for t in tasks]}
    atomic_write_text(root / "sweep.json", json.dumps(plan, indent=1))
    return root


# ------------------------------------------------------------------ the folder


def check_task(task: SweepTask, task_id: Any, where: Any) -> None:
    """``task_id`` and the names in ``task`` are safe as paths and agree (a null task ``null.<name>``, a
    robustness task ``<target>.<attack>__...``); else a ConfigError naming ``where``."""
    checked_id(task_id, "task id", where)
    if task.kind == "null":
        ok = task_id == f"null.{task.name}" and _NAME.match(task.name) is not None
    elif task.kind == "robustness":  # <target>.<attack>__<strength>__s<seed>; the job names its result file so
        ok = (_NAME.match(task.target) is not None and task.target != "null" and _NAME.match(task.attack) is not None
              and task_id.startswith(f"{task.target}.{task.attack}__"))
    else:
        ok = False
    if not ok:
        raise ConfigError(f"{where}: task {task_id!r} ({task.kind} {task.target or task.name!r}) is not a valid sweep task")


class Sweep:
    """A sweep folder: its config, its tasks, and where each task's files go.

    Everything read from the folder is checked before it names a path: task
    ids, target and null-encoder names (``sweep.json``), task and job ids
    (``jobs.json``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        plan = self.root / "sweep.json"
        if not plan.is_file():
            raise ConfigError(f"'{self.root}' is not a sweep folder (no sweep.json); start one with `awenc sweep run`")
        try:
            data = json.loads(plan.read_text())
        except ValueError as e:
            raise ConfigError(f"{plan}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ConfigError(f"{plan}: unknown format {found!r}, expected {SWEEP_FORMAT}")
        self.cwd = data.get("cwd") or os.getcwd()  # where relative paths of the null population's config point
        self.tasks: dict[str, SweepTask] = {}
        for t in data.get("tasks") or []:
            try:
                t = dict(t)
                tid = t.pop("id")
                task = SweepTask(**t)
            except (TypeError, ValueError, KeyError):
                raise ConfigError(f"{plan}: a task entry is not a sweep task: {str(t)[:200]}") from None
            check_task(task, tid, plan)
            self.tasks[tid] = task
        self._config: Any = None

    @property
    def config(self) -> SweepConfig:
        """The sweep's config (imports the schemas, and with them torch)."""
        if self._config is None:
            from dist_awenc.config import load_config

            self._config = load_config(_schema(), self.root / "config.yaml")
        return self._config

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def targets(self) -> list[str]:
        """The watermarked encoders' names, in plan order."""
        return list(dict.fromkeys(t.target for t in self.tasks.values() if t.kind == "robustness"))

    def target_dir(self, target: str) -> Path:
        return self.root / "targets" / target

    def result_path(self, task_id: str) -> Path:
        task = self.tasks[task_id]
        if task.kind == "null":
            return self.root / "null" / f"{task.name}.json"
        # a robustness task's id is <target>.<the robustness task's id> (checked when the plan was read)
        return self.target_dir(task.target) / "tasks" / f"{task_id[len(task.target) + 1:]}.json"

    def error_path(self, task_id: str) -> Path:
        return self.root / "errors" / f"{checked_id(task_id, 'task id', self.root / 'errors')}.json"

    def done(self, task_id: str) -> bool:
        return self.result_path(task_id).exists()

    def submissions(self) -> list[dict]:
        p = self.root / "jobs.json"
        if not p.exists():
            return []
        try:
            subs = json.loads(p.read_text())["submissions"]
            for sub in subs:
                for job_id, ids in sub["jobs"].items():
                    checked_id(job_id, "job id", p)
                    for i in ids:
                        checked_id(i, "task id", p)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{p}: not a list of submissions ({type(e).__name__}: {e})") from None
        return subs

    def record(self, submission: dict) -> None:
        """Append a submission to jobs.json; the read-modify-write holds jobs.json.lock (concurrent submitters)."""
        p = self.root / "jobs.json"
        with locked(p):
            subs = self.submissions() + [submission]
            atomic_write_text(p, json.dumps({"submissions": subs}, indent=1))

    def latest_jobs(self) -> dict[str, tuple[str, str]]:
        """Task id -> (job id, executor) of its latest submission."""
        out: dict[str, tuple[str, str]] = {}
        for sub in self.submissions():
            for job_id, ids in sub["jobs"].items():
                for i in ids:
                    out[i] = (job_id, sub["executor"])
        return out


# ------------------------------------------------------------------ inside a job


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

    from dist_awenc.launch.robustness import Context, run_task

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


# ------------------------------------------------------------------ submission


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


# ------------------------------------------------------------------ status


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


# ------------------------------------------------------------------ collection


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
        from dist_awenc.launch.robustness import collect as collect_target
        from dist_awenc.launch.robustness import write_csv

        cfg = sweep.config
        for target in with_results:
            tdir = sweep.target_dir(target)
            summaries[target] = collect_target(tdir, cfg.grid.utility_drop, cfg.verify.calibration)
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
            print(f"  {target} {mode:<15} TPR {m['tpr']:.3f} ({m['detected']}/{m['of']})", file=out)
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


# ------------------------------------------------------------------ the stage


def run(cfg: SweepConfig, executor: str = "auto", wait_for: Optional[bool] = None, out=None) -> Sweep:
    """``awenc sweep run``: prepare the folder and submit every task that is missing or failed.

    Running it again submits nothing that is done, queued or running. With
    ``wait_for`` (default: yes for the local and debug executors) it waits and collects.
    """
    out = out or sys.stdout
    sweep = Sweep(prepare(cfg))
    return _submit_open(sweep, executor, wait_for, out, "run")


def resume(sweep: Sweep, executor: str = "auto", wait_for: Optional[bool] = None, out=None) -> Sweep:
    """``awenc sweep resume``: resubmit only the tasks that failed or were never submitted."""
    out = out or sys.stdout
    return _submit_open(sweep, executor, wait_for, out, "resume")


def _submit_open(sweep: Sweep, executor: str, wait_for: Optional[bool], out, action: str) -> Sweep:
    kind = resolve_executor(executor)
    states = task_states(sweep)
    todo = [t.id for t in states.values() if t.state in ("failed", "missing")]
    busy = sum(t.state in ("running", "pending", "unknown") for t in states.values())
    if not todo:
        print(f"sweep {action}: nothing to submit ({counts(states)['done']} done, {busy} queued or running)", file=out)
    else:
        recs = submit(sweep, todo, kind)
        jobs = sum(len(r["jobs"]) for r in recs)
        arrays = ", ".join(r.get("array", next(iter(r["jobs"]))) for r in recs)
        print(f"sweep {action}: submitted {len(todo)} task(s) as {jobs} {kind} job(s) [{arrays}]"
              + (f"; {busy} already queued or running" if busy else "") + f" -> {sweep.root}", file=out, flush=True)
    if wait_for if wait_for is not None else kind in ("local", "debug"):
        wait(sweep, out=out)
        collect(sweep, out=out)
    elif todo:
        print(f"follow it with: awenc sweep status --dir {sweep.root}", file=out)
    return sweep


def sweep_command(action: str, config: Optional[str] = None, overrides: Optional[list[str]] = None,
                  directory: Optional[str] = None, executor: str = "auto", wait_for: Optional[bool] = None) -> int:
    """The body of ``awenc sweep <action>``; returns the exit code (1 where tasks failed, for status/collect)."""
    if action == "run":
        if directory:
            raise ConfigError("`awenc sweep run` takes --config (and overrides); use `resume --dir` for an existing folder")
        from dist_awenc.config import load_config

        run(load_config(_schema(), config, overrides or []), executor, wait_for)
        return 0
    if directory:
        if overrides:
            raise ConfigError("overrides go with --config, not --dir")
        sweep = Sweep(directory)
    elif action == "resume":
        from dist_awenc.config import load_config

        # resume --config may bring new slurm.* settings (a longer time limit...); the grid must stay the same
        sweep = Sweep(prepare(load_config(_schema(), config, overrides or [])))
    else:  # status, collect: only the folder's name is needed, and no torch
        sweep = Sweep(folder_of_config(config, overrides))
    if action == "status":
        states = status(sweep)
        return 1 if any(t.state == "failed" for t in states.values()) else 0
    if action == "collect":
        summary = collect(sweep)
        return 1 if summary["failed"] else 0
    if action == "resume":
        resume(sweep, executor, wait_for)
        return 0
    raise ConfigError(f"unknown sweep action '{action}'; valid: run, status, collect, resume")


RUN_KEYS = ("name", "out_dir", "seed")  # dist_awenc.config.RunSection's fields (a test checks)
RUN_OUT_DIR = "runs"  # RunSection's default out_dir


def folder_of_config(config: Optional[str], overrides: Optional[list[str]] = None) -> Path:
    """The sweep folder a sweep config names (``run.out_dir``/``run.name``, overrides applied), read without the schema.

    For ``status`` and ``collect``, which only read the folder (its
    config.yaml was checked when the sweep was prepared): the file and the
    overrides may name SweepConfig's sections and ``run``'s keys only; the
    other sections are not checked here. Loading the schema would import torch.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = str(config) if config else "overrides"
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key.sub=value")
    try:
        body: Any = OmegaConf.create({})
        if config:
            p = Path(config)
            if not p.is_file():
                raise ConfigError(f"config file '{p}' does not exist")
            body = OmegaConf.load(p)
            if not isinstance(body, DictConfig):
                raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        merged = OmegaConf.to_container(OmegaConf.merge(body, OmegaConf.from_dotlist(list(overrides or []))))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - YAML errors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    assert isinstance(merged, dict)
    for key in merged:
        if key not in SECTIONS:
            raise ConfigError(f"{where}: unknown config key '{key}'; valid keys there: {', '.join(sorted(SECTIONS))}")
    run = merged.get("run")
    run = {} if run is None else run
    if not isinstance(run, dict):
        raise ConfigError(f"{where}: section 'run' must be a mapping of keys ({', '.join(RUN_KEYS)}), got {run!r}")
    for key in run:
        if key not in RUN_KEYS:
            raise ConfigError(f"{where}: unknown config key 'run.{key}'; valid keys there: {', '.join(sorted(RUN_KEYS))}")
    name, out_dir = run.get("name", DEFAULT_NAME), run.get("out_dir", RUN_OUT_DIR)
    return Path(str(out_dir)).expanduser().resolve() / str(name)


# ------------------------------------------------------------------ sbatch templates' entry point


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


if __name__ == "__main__":
    raise SystemExit(main())
