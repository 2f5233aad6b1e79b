"""The plan of a sweep: its config schema, its targets, the task list, and the folder it is prepared in.

torch-free at import: :class:`SweepConfig` (whose sections import torch) is
defined on first use, and the config sections, the robustness grid and the
calibration are imported inside the functions that need them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Optional

from dist_awenc.errors import ConfigError
from dist_awenc.files import atomic_write_text
from dist_awenc.launch.cluster import SlurmSection, checked_id

SWEEP_FORMAT = "dist_awenc.sweep/1"
MAIN_TARGET = "main"
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
    from dist_awenc.stages.robustness import GridSection

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
        """The :class:`~dist_awenc.stages.robustness.Task` of a robustness task."""
        from dist_awenc.stages.robustness import Task

        return Task(self.attack, self.strength, self.seed)


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
    from dist_awenc.stages.robustness import RobustnessConfig

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
    from dist_awenc.stages.calibrate import null_encoder_configs

    root = Path(ccfg.run.out_dir) / ccfg.run.name / "population"
    return {c.run.name: c for c in null_encoder_configs(ccfg, root)}


def expand(cfg: SweepConfig, null_names: Iterable[str] = ()) -> list[SweepTask]:
    """Every task: the null population first (the longest jobs), then target x attack x strength x seed."""
    from dist_awenc.stages.robustness import expand_grid

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
