"""Dotted overrides: ``dotted.key=value`` strings whose value is parsed as YAML
(``train.max_steps=10``, ``molora.target_modules=[q_proj,v_proj]``), applied to the raw
nested dict of a run config before it is validated."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from molora.training.run_config.sections import MISSING, raise_problems

__all__ = ["apply_overrides", "parse_overrides"]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML).

    Raises:
        RunConfigError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r} must look like dotted.key=value (e.g. train.max_steps=10)")
            continue
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override {key!r}: value {raw!r} is not valid YAML ({e})")
    raise_problems(problems)
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted key set (intermediate dicts created).

    Raises:
        RunConfigError: a dotted key that goes through a non-dict value.
    """
    out = copy.deepcopy(raw)
    problems = []
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or child == MISSING:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is {child!r}, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    raise_problems(problems)
    return out
