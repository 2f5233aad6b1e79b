"""``awenc sweep run|status|collect|resume``: the stage, and the sweep folder a config names."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from dist_awenc.errors import ConfigError
from dist_awenc.launch.cluster import resolve_executor
from dist_awenc.launch.sweep.folder import Sweep
from dist_awenc.launch.sweep.plan import DEFAULT_NAME, SECTIONS, _schema, prepare
from dist_awenc.launch.sweep.report import collect, counts, status, task_states, wait
from dist_awenc.launch.sweep.submit import submit


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
