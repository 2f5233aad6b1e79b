"""Run folders: ``<out_dir>/<name>/`` holding config.yaml, status.json and a stage's files.

A folder's ``status.json`` says ``running``, ``complete`` or ``failed``; an
interrupted run stays ``running`` (or ``failed``) and never looks complete, and
running the same command again resumes it from its last checkpoint.

Configs are compared by the fields that change results: :data:`COSMETIC`
fields (progress bars, logging and checkpoint intervals, loader workers...)
may differ between the run in a folder and the command that resumes or reuses
it. No run folder is ever deleted: a real difference is refused, naming the
first differing field, unless the folder holds nothing but a config and a
status (a run that failed before its first step), which a corrected command
then takes over.
"""
from __future__ import annotations

import dataclasses
import json
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import yaml

from dist_awenc.config import to_yaml
from dist_awenc.encoders.io import atomic_write_text
from dist_awenc.engine import dist
from dist_awenc.errors import ConfigError
from dist_awenc.log import info


# Config fields that change how a run is watched or stored, never what it computes. A bare name matches that field
# in every section (train.progress, and the demo's pretrain.progress / embed.progress: a section is a dataclass field
# of the config, not a mapping like a sweep's `encoders`); a dotted path matches one field.
COSMETIC = frozenset({
    "progress",  # the progress bar
    "log_every",  # metrics.jsonl interval
    "checkpoint_every",  # resuming from any checkpoint gives the same run
    "checkpoint_every_epochs",
    "keep_checkpoints",
    "trackers",  # tensorboard / wandb
    "num_workers",  # data loader processes (the batches do not depend on them)
    "run.out_dir",  # where the folder is: implied by the folder being compared
    "run.name",
})
# Sections added after run folders were written, whose defaults compute what those runs computed (robust,
# rehearsal and shadow: off; suspect_card: unset, the suspect's card decides): a folder whose config predates the
# section is the same run as a config holding it at defaults.
ADDED_AT_DEFAULTS = frozenset({"robust", "rehearsal", "shadow", "suspect_card", "specific"})
# Fields added the same way, in whatever section holds them (data.splits: the split every run used before;
# classes: the dataset's own, or none stated; views.crop: device, how every view was cut before; data.decode: cpu;
# data.bad_files: skip, which reads every readable file as before; rehearsal.reference_archs: no references beyond
# f0's architecture; label_classes is not here: it adds per-class thresholds). Issue #31's: optim.lr_scaling none
# and warmup_epochs unset (lr and warm-up as written), train.grad_accum_ok (a permission, computes nothing),
# encoder.proj_out_norm none, ssl.symmetric true and loss_reduction mean (the loss every run computed),
# views.solarize_p 0 and view2 empty (the views every run drew), encoder.proj_layers 2 and freeze_patch_embed false
# (the heads and trained parameters every run had); #27's loss.scales empty (stage 2 at the input size only) and
# specific.suppress 0 (the alternatives held at f0's response, as before).
FIELDS_ADDED_AT_DEFAULTS = frozenset({"splits", "classes", "crop", "decode", "bad_files", "reference_archs",
                                      "lr_scaling", "warmup_epochs", "grad_accum_ok", "proj_out_norm", "symmetric",
                                      "loss_reduction", "solarize_p", "view2", "proj_layers", "freeze_patch_embed",
                                      "scales", "suppress"})
RESOLVED_FILE = "resolved.json"  # a training stage's optim/train sections resolved at its batch and process count
# files of a run folder that are no outputs: its config, its status, what it resolved to, `awenc submit`'s job
# folder, the engine record
_BOOKKEEPING = ("config.yaml", "status.json", RESOLVED_FILE, "slurm", "engine.json")
_ABSENT = "<absent>"


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def status(run_dir: Path) -> dict:
    p = run_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def first_difference(old: Any, new: Any, sections: Iterable[str] = (), path: str = "") -> Optional[tuple[str, Any, Any]]:
    """The first field (dotted path) whose value differs between two parsed configs, ignoring :data:`COSMETIC`
    fields (bare names only in ``sections``): ``(path, old value, new value)``, or None where they describe the
    same run."""
    sections = frozenset(sections)
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            sub = f"{path}.{key}" if path else str(key)
            if sub in COSMETIC or (path in sections and str(key) in COSMETIC):
                continue
            found = first_difference(old.get(key, _ABSENT), new.get(key, _ABSENT), sections, sub)
            if found:
                return found
        return None
    return None if old == new else (path or "<config>", old, new)


def config_difference(run_dir: Path, cfg: Any) -> Optional[tuple[str, Any, Any]]:
    """How ``cfg`` differs from the config of the run in ``run_dir`` (see :func:`first_difference`)."""
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        return "config.yaml", f"unreadable ({type(e).__name__})", "the new config"
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    new = yaml.safe_load(to_yaml(cfg))
    _drop_added_fields(old, new, cfg)
    return first_difference(old, new, sections)


def _drop_added_fields(old: Any, new: dict, node: Any) -> None:
    """Remove from ``new`` each section of :data:`ADDED_AT_DEFAULTS` and each field of
    :data:`FIELDS_ADDED_AT_DEFAULTS` that ``old`` lacks and ``node`` (the dataclass ``new`` was written from) holds
    at its default, section by section."""
    if not isinstance(old, dict) or not dataclasses.is_dataclass(node):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        added = f.name in (ADDED_AT_DEFAULTS if dataclasses.is_dataclass(value) else FIELDS_ADDED_AT_DEFAULTS)
        if added and f.name not in old:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value == default:
                new.pop(f.name, None)
        elif dataclasses.is_dataclass(value):
            _drop_added_fields(old.get(f.name), new.get(f.name, {}), value)


def _describe(diff: tuple[str, Any, Any]) -> str:
    field, old, new = diff
    return f"{field} was {old!r}, now {new!r}"


def holds_outputs(run_dir: Path) -> bool:
    """Anything in the folder besides its config, its status and `awenc submit`'s job folder: checkpoints, metrics,
    weights (empty files and folders do not count)."""
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        if p.name in _BOOKKEEPING:
            continue
        if p.is_dir():
            if any(q.is_file() and q.stat().st_size > 0 for q in p.rglob("*")):
                return True
        elif not p.is_file() or p.stat().st_size > 0:
            return True
    return False


@contextmanager
def open_run(cfg, stage: str, *, allow_complete: bool = False) -> Iterator[Path]:
    """Create or resume the run folder of ``cfg``; mark it complete or failed at the end.

    An unfinished run resumes when its config differs from ``cfg`` in
    :data:`COSMETIC` fields at most; a failed run that left no outputs (it
    failed before its first checkpoint or metric) is taken over by any config.

    Raises:
        ConfigError: the folder holds a complete run, or an unfinished run with another config that is running
            (or was killed) or left outputs; the message names the first differing field and both values.
    """
    run_dir = run_dir_of(cfg)
    yaml_text = to_yaml(cfg)
    prior = status(run_dir)
    if prior.get("state") == "complete" and not allow_complete:
        raise ConfigError(f"run folder '{run_dir}' already holds a complete {prior.get('stage')} run; choose another run.name")
    old_cfg = run_dir / "config.yaml"
    if prior and old_cfg.exists() and not allow_complete:
        diff = config_difference(run_dir, cfg)
        if diff and (prior.get("state") != "failed" or holds_outputs(run_dir)):
            # (a "running" folder may be a live run: only a failed one without outputs is taken over)
            raise ConfigError(f"run folder '{run_dir}' holds an unfinished {prior.get('stage')} run with another config "
                              f"({_describe(diff)}); resume it with the same config or choose another run.name")
        if diff:
            info(f"{run_dir} holds a run that failed before its first step ({_describe(diff)}): "
                 f"starting it again with the new config")
    started = time.time()
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(old_cfg, yaml_text)
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

    For orchestrating stages (demo, calibration) that own their sub-folders.
    "The same config" ignores :data:`COSMETIC` fields. Nothing is deleted: a
    complete run made with another config is refused, naming the first
    differing field; an unfinished one goes to :func:`open_run` (resumed,
    taken over when it left no outputs, else refused).

    Raises:
        ConfigError: the folder holds a run whose results the new config would not reproduce.
    """
    run_dir = run_dir_of(cfg)
    if status(run_dir).get("state") == "complete":
        diff = config_difference(run_dir, cfg) if (run_dir / "config.yaml").exists() else ("config.yaml", _ABSENT, "the new config")
        if diff is None:
            info(f"reusing complete {run_dir}")
            return run_dir / output
        raise ConfigError(f"run folder '{run_dir}' holds a complete run made with other settings ({_describe(diff)}); "
                          f"nothing was deleted: rerun with the same settings, choose another run.name or run.out_dir, or remove "
                          f"the folder yourself")
    return fn(cfg)
