"""Loading a run config: the YAML file, then the dotted overrides, then validation.

Relative data paths written in the YAML file are resolved against the file's folder; those
given as overrides, against the current directory.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from molora.training.run_config.overrides import apply_overrides, parse_overrides
from molora.training.run_config.sections import MISSING, SECTIONS, RunConfig, RunConfigError
from molora.training.run_config.validation import build_run_config

__all__ = ["load_run_config"]


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config, apply overrides, validate every key and value.

    Args:
        path: the YAML file, or None to start from defaults (overrides only).
        overrides: ``["dotted.key=value", ...]`` or an already parsed ``{dotted.key: value}``.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RunConfigError: listing every unknown key, bad type or value and missing ``???``.
    """
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise RunConfigError(
                f"{path}: the top level must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}"
            )
        base_dir = path.resolve().parent
    if isinstance(overrides, dict):
        parsed = dict(overrides)
    else:
        parsed = parse_overrides(list(overrides or []))
    raw = apply_overrides(_expand_task_shorthand(raw), parsed)
    config = build_run_config(raw, overridden=set(parsed), base_dir=base_dir)
    config.source = None if path is None else str(path)
    return config


def _expand_task_shorthand(raw: dict[str, Any]) -> dict[str, Any]:
    """``data.tasks.NAME: FILE`` -> ``{train: FILE}``, so that ``data.tasks.NAME.eval=...`` applies."""
    tasks = raw.get("data", {}).get("tasks") if isinstance(raw.get("data"), dict) else None
    if not isinstance(tasks, dict) or not any(isinstance(v, str) and v != MISSING for v in tasks.values()):
        return raw
    raw = copy.deepcopy(raw)
    raw["data"]["tasks"] = {k: {"train": v} if isinstance(v, str) and v != MISSING else v for k, v in tasks.items()}
    return raw
