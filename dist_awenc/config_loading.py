"""Loading a stage's config: schema defaults <- YAML file <- dotted overrides (OmegaConf), validated.

A YAML file or a ``key.sub=value`` override naming a key the schema does not
have, or a value of the wrong type, is a :class:`ConfigError` that names the
key and lists the valid ones. The sections themselves are in :mod:`dist_awenc.config`,
which re-exports these functions.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dist_awenc.errors import ConfigError


C = TypeVar("C")


def _valid_keys(schema: type, dotted: str) -> list[str]:
    """Field names of the section that ``dotted`` (a.b.c) points into."""
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break
        f = fields[part]
        node = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.type
        node = type(node) if dataclasses.is_dataclass(node) and not isinstance(node, type) else node
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


def load_config(schema: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Schema defaults <- YAML file <- dotted overrides, validated into ``schema``.

    Raises:
        ConfigError: one line naming the file, the key and what was expected.
    """
    where = str(path) if path else "overrides"
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(schema, Path(path)))
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key.sub=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        valid = ", ".join(_valid_keys(schema, key))
        raise ConfigError(f"{where}: unknown config key '{key}'; valid keys there: {valid}") from None
    except ValidationError as e:
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{where}: bad value for '{e.full_key}': {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    except (ValueError, TypeError) as e:  # __post_init__ checks of a section
        raise ConfigError(f"{where}: {e}") from None


def _load_yaml(schema: type, p: Path) -> Any:
    """The YAML file as an OmegaConf mapping whose sections are mappings."""
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        loaded = OmegaConf.load(p)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    sections = {f.name: f for f in dataclasses.fields(schema)}
    for key in loaded:
        f = sections.get(str(key))
        if f is not None and f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            if not isinstance(loaded[key], DictConfig):
                valid = ", ".join(sorted(x.name for x in dataclasses.fields(f.default_factory())))
                raise ConfigError(f"{p}: section '{key}' must be a mapping of keys ({valid}), got {loaded[key]!r}")
    return loaded


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
