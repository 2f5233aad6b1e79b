"""Run folders: ``<out_dir>/<name>/`` holding config.yaml, status.json and a stage's files.

A folder's ``status.json`` says ``running``, ``complete`` or ``failed``; an
interrupted run stays ``running`` (or ``failed``) and never looks complete, and
running the same command again resumes it from its last checkpoint.
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dist_awenc.config import to_yaml
from dist_awenc.encoders.io import atomic_write_text
from dist_awenc.engine import dist
from dist_awenc.engine.log import info
from dist_awenc.errors import ConfigError


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def status(run_dir: Path) -> dict:
    p = run_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


@contextmanager
def open_run(cfg, stage: str, *, allow_complete: bool = False) -> Iterator[Path]:
    """Create or resume the run folder of ``cfg``; mark it complete or failed at the end.

    Raises:
        ConfigError: the folder holds a complete run, or a run with another config.
    """
    run_dir = run_dir_of(cfg)
    yaml = to_yaml(cfg)
    prior = status(run_dir)
    if prior.get("state") == "complete" and not allow_complete:
        raise ConfigError(f"run folder '{run_dir}' already holds a complete {prior.get('stage')} run; choose another run.name")
    old_cfg = run_dir / "config.yaml"
    if prior and old_cfg.exists() and old_cfg.read_text() != yaml and not allow_complete:
        raise ConfigError(f"run folder '{run_dir}' holds an unfinished run with a different config; resume it with the same config or choose another run.name")
    started = time.time()
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(old_cfg, yaml)
        _write_status(run_dir, stage, "running", started)
    dist.barrier()
    try:
        yield run_dir
    except BaseException as e:
        if dist.is_main():
            _write_status(run_dir, stage, "failed", started, error=f"{type(e).__name__}: {e}".splitlines()[0],
                          trace=traceback.format_exc(limit=5))
        raise
    if dist.is_main():
        _write_status(run_dir, stage, "complete", started)


def _write_status(run_dir: Path, stage: str, state: str, started: float, **extra: str) -> None:
    body = {"stage": stage, "state": state, "started": started, "seconds": round(time.time() - started, 2), **extra}
    atomic_write_text(run_dir / "status.json", json.dumps(body, indent=2))


def reuse_or_run(cfg: Any, fn: Callable[[Any], Path], output: str) -> Path:
    """Reuse a complete stage run of the same config, resume an unfinished one, else start afresh.

    For orchestrating stages (demo, calibration) that own their sub-folders:
    a sub-folder left by a different config is replaced.
    """
    run_dir = run_dir_of(cfg)
    same = (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() == to_yaml(cfg)
    if same and status(run_dir).get("state") == "complete":
        info(f"reusing complete {run_dir}")
        return run_dir / output
    if run_dir.exists() and not same:
        info(f"{run_dir} was made with other settings: running it again")
        shutil.rmtree(run_dir)
    return fn(cfg)
