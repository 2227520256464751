"""Config composition: Hydra's compose API over the preset tree packaged in ``conf/``.

``load_config(overrides)`` composes ``group=preset`` and ``dotted.key=value`` overrides on top of the typed
schema (``schema.RunConfig``), validates once and returns the dataclass. Every failure becomes a
``ConfigError`` with a one-line message naming the key or preset and the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from biollm_cls.config.schema import ConfigError, RunConfig, total_steps, validate

__all__ = ["ConfigError", "RunConfig", "load_config", "to_dict", "flatten", "config_dir", "total_steps"]

GROUPS = ("model", "benchmark", "experts", "replay", "consolidation", "ewc", "scheduler", "train", "logging",
          "ablation")


def config_dir() -> Path:
    """The packaged preset tree (works from a wheel as well as from a source checkout)."""
    return Path(str(resources.files("biollm_cls.config") / "conf"))


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _register_schema() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose, type-check and validate a run config. Raises ConfigError (one line) on any problem."""
    overrides = list(overrides)
    _precheck(overrides)
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = compose(config_name="config", overrides=overrides)
        cfg = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf errors are multi-line; condense them
        raise ConfigError(_condense(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    return validate(cfg)


def _precheck(overrides: list[str]) -> None:
    """Catch the common mistakes before Hydra, with messages that name the valid choices."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form group=preset or dotted.key=value")
        key, value = item.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            if value not in presets(key):
                raise ConfigError(f"unknown preset {key}={value}; choose one of: {', '.join(presets(key))}")
            continue
        node: Any = RunConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(node)}
            if part not in names:
                where = ".".join(parts[:depth]) or "the top level"
                valid = ", ".join(sorted(names))
                raise ConfigError(f"unknown key {key!r}: {part!r} is not a key of {where} (valid: {valid})")
            node = names[part].type
            if isinstance(node, str):
                node = _resolve_type(node)
            if not dataclasses.is_dataclass(node):
                if depth != len(parts) - 1:
                    raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: depth + 1])} is not a group")
                break
        else:
            raise ConfigError(f"{key!r} is a group of keys, not a value: set one of its keys, e.g. {key}.<key>=...")


def _resolve_type(name: str) -> Any:
    from biollm_cls.config import schema

    return getattr(schema, name, name)


def _condense(exc: Exception, overrides: list[str]) -> str:
    text = str(exc)
    if exc.__cause__ is not None:
        text = f"{text}\n{exc.__cause__}"
    m = re.search(r"Value '(.*?)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    key = re.search(r"full_key: ([\w.]+)", text)
    if m:
        where = key.group(1) if key else "a key"
        return f"{where}={m.group(1)!r} has the wrong type: expected {m.group(2).lower()}"
    m = re.search(r"Value '(.*?)' is not a valid (\w+)", text)
    if m:
        where = key.group(1) if key else "a key"
        return f"{where}={m.group(1)!r} has the wrong type: expected {m.group(2)}"
    m = re.search(r"Could not find '([\w/]+)'", text)
    if m:
        group = m.group(1).split("/")[0]
        return f"unknown preset {m.group(1)}; choose one of: {', '.join(presets(group))}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if key:
        first = f"{key.group(1)}: {first}"
    return first


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (nested mappings joined with `sep`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}{sep}", sep))
        else:
            flat[name] = value
    return flat


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
