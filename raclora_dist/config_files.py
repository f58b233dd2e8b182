"""A config file as a mapping, before validation: reading its YAML, dotted command-line
overrides merged into it, and the error every config problem raises."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid config; the message names the field(s), the value(s) and what is allowed."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "raclora.target_modules=[q_proj]"]`` -> nested dict (YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected section.field=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into a copy of ``base``: a mapping merges section by section, any other
    value replaces."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping; a missing file or broken YAML is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def expand_shorthands(data: dict[str, Any]) -> dict[str, Any]:
    """``model.quantization: nf4`` -> ``{method: nf4}``, so that a dotted override such as
    ``model.quantization.double_quant=false`` merges into it instead of replacing it."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("quantization"), str):
        data = copy.deepcopy(data)
        data["model"]["quantization"] = {"method": model["quantization"]}
    return data
