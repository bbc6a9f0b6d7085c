"""From a raw nested dict (YAML + overrides) to a validated :class:`RunConfig`: each section
converted, data paths resolved, then each value and the cross-section constraints checked.
Problems are collected and raised once, each naming its dotted key."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from molora.core.config import MoLoRAConfig
from molora.training.data.columns import MIX_STRATEGIES
from molora.training.run_config.sections import (
    LR_SCHEDULES,
    MISSING,
    MIXED_PRECISION,
    MODEL_DTYPES,
    QUANTIZATION_KEYS,
    REPORT_TO,
    SECTIONS,
    TASK_TYPES,
    TOP_LEVEL_EXTRA,
    DataSection,
    ModelSection,
    RunConfig,
    TaskSpec,
    TrainSection,
    raise_problems,
)
from molora.training.run_config.typed import find_missing, to_dataclass, typed_values, unknown_keys

__all__ = ["build_run_config"]


def build_run_config(raw: dict[str, Any], *, overridden: set[str], base_dir: Path) -> RunConfig:
    """Convert and check a raw run config (YAML with the overrides applied).

    Args:
        raw: ``{section: {key: value}}``.
        overridden: the dotted keys given as overrides (their paths are relative to the
            current directory, not to ``base_dir``).
        base_dir: the YAML file's folder, against which its relative data paths resolve.

    Returns:
        The validated :class:`RunConfig` (``source`` not set).

    Raises:
        RunConfigError: listing every problem, each with its dotted key.
    """
    problems: list[str] = []
    unknown_keys(raw, list(SECTIONS) + list(TOP_LEVEL_EXTRA), "", problems)
    find_missing(raw, "", problems)
    sections = {}
    for name in SECTIONS:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            problems.append(f"section '{name}' must be a mapping, got {value!r}")
            value = {}
        sections[name] = value
    model = to_dataclass(ModelSection, sections["model"], "model", problems)
    train = to_dataclass(TrainSection, sections["train"], "train", problems)
    data = _build_data(sections["data"], problems, overridden=overridden, base_dir=base_dir)
    if model is not None:
        _resolve_adapters(model, overridden=overridden, base_dir=base_dir)
    molora = _build_molora(_infer_tasks(sections["molora"], data), problems)
    if not problems:
        _check_model(model, problems)
        _check_data(data, model, problems)
        _check_train(train, problems)
        _check_cross(model, molora, data, problems)
    raise_problems(problems)
    return RunConfig(model=model, molora=molora, data=data, train=train)


def _infer_tasks(raw: dict[str, Any], data: DataSection | None) -> dict[str, Any]:
    """``molora.num_tasks`` and ``molora.task_names`` from ``data.tasks`` when not given.

    The task router needs one table row per task; the tasks are the data.tasks entries, in
    order (task id i is the i-th entry), so the user does not count them by hand. Names are
    filled in so that task ids may be given by name (CLI, API) and exports are named per task.
    """
    tasks = list(data.tasks) if data is not None and isinstance(data.tasks, dict) else []
    if not tasks:
        return raw
    raw = dict(raw)
    if raw.get("router") == "task" and raw.get("num_tasks") is None:
        raw["num_tasks"] = len(tasks)
    if raw.get("task_names") is None and raw.get("num_tasks") in (None, len(tasks)):
        raw["task_names"] = tasks
    return raw


def _build_molora(raw: dict[str, Any], problems: list[str]) -> MoLoRAConfig | None:
    values = typed_values(MoLoRAConfig, raw, "molora", problems)
    if values is None:
        return None
    if isinstance(values.get("target_modules"), tuple):
        values["target_modules"] = list(values["target_modules"])
    try:
        return MoLoRAConfig(**values)
    except ValueError as e:
        lines = str(e).splitlines()
        details = [line.strip().removeprefix("- ") for line in lines[1:]] or lines
        problems.extend(f"molora: {_as_run_config_keys(d)}" for d in details)
        return None


def _as_run_config_keys(detail: str) -> str:
    """MoLoRAConfig's message with its fields named as the run config's keys: ```top_k``` and
    ``num_experts=4`` become ``molora.top_k`` and ``molora.num_experts=4`` (what a user writes)."""
    fields = {f.name for f in dataclasses.fields(MoLoRAConfig)}
    detail = re.sub(r"`(\w+)((?:\[[^\]`]*\])?)`", lambda m: f"molora.{m[1]}{m[2]}" if m[1] in fields else m[0], detail)
    return re.sub(r"(?<![.\w`])(\w+)=", lambda m: f"molora.{m[1]}=" if m[1] in fields else m[0], detail)


def _build_data(
    raw: dict[str, Any], problems: list[str], *, overridden: set[str], base_dir: Path
) -> DataSection | None:
    raw = dict(raw)
    tasks_raw = raw.pop("tasks", None)
    data = to_dataclass(DataSection, raw, "data", problems)
    if data is None:
        return None
    if tasks_raw is None or tasks_raw == {}:
        problems.append("'data.tasks' must name at least one task: data.tasks.<name>.train=<file>")
        return data
    if not isinstance(tasks_raw, dict):
        problems.append(f"'data.tasks' must be a mapping {{task name: spec}}, got {tasks_raw!r}")
        return data
    tasks = {}
    for name, spec in tasks_raw.items():
        key = f"data.tasks.{name}"
        if isinstance(spec, (str, os.PathLike)):
            spec = {"train": str(spec)}
        if not isinstance(spec, dict):
            problems.append(
                f"'{key}' must be a file path or a mapping with 'train' (and 'eval', columns), got {spec!r}"
            )
            continue
        task = to_dataclass(TaskSpec, spec, key, problems)
        if task is None:
            continue
        if task.train is None and spec.get("train") != MISSING:
            problems.append(f"'{key}.train' is required: the task's training file")
        for which in ("train", "eval"):
            value = getattr(task, which)
            if value is not None:
                from_cli = _overridden(f"{key}.{which}", overridden)
                setattr(task, which, _resolve(value, Path.cwd() if from_cli else base_dir))
        tasks[str(name)] = task
    data.tasks = tasks
    if data.cache_dir is not None and not _overridden("data.cache_dir", overridden):
        data.cache_dir = _resolve(data.cache_dir, base_dir)
    return data


def _resolve_adapters(model: ModelSection, *, overridden: set[str], base_dir: Path) -> None:
    """``model.from_adapters`` folders resolved like data paths (CLI overrides: against the cwd)."""
    def base(key: str) -> Path:
        return Path.cwd() if _overridden(key, overridden) else base_dir

    if isinstance(model.from_adapters, list):
        model.from_adapters = [_resolve(p, base("model.from_adapters")) for p in model.from_adapters]
    elif isinstance(model.from_adapters, dict):
        model.from_adapters = {
            k: _resolve(p, base(f"model.from_adapters.{k}")) for k, p in model.from_adapters.items()
        }


def _check_adapters(model: ModelSection, molora: MoLoRAConfig, data: DataSection, problems: list[str]) -> None:
    adapters = model.from_adapters
    if adapters is None:
        return
    tasks = list(data.tasks)
    if isinstance(adapters, dict) and sorted(adapters) != sorted(tasks):
        problems.append(
            f"'model.from_adapters' as a mapping needs one adapter per data.tasks name {tasks}, got keys {list(adapters)}"
        )
    if len(adapters) != molora.num_experts:
        problems.append(
            f"'molora.num_experts' must equal the number of model.from_adapters ({len(adapters)}), got {molora.num_experts}"
        )
    if not adapters:
        problems.append("'model.from_adapters' must name at least one adapter folder, or be null")


def _check_model(model: ModelSection, problems: list[str]) -> None:
    has_path, has_cfg = model.name_or_path is not None, model.from_config is not None
    if has_path == has_cfg:
        problems.append(
            "'model' needs exactly one of 'model.name_or_path' (a model folder) or 'model.from_config' "
            f"(a dict with model_type), got name_or_path={model.name_or_path!r}, from_config={model.from_config!r}"
        )
    if has_cfg and "model_type" not in model.from_config:
        problems.append(
            f"'model.from_config' must hold 'model_type' (e.g. llama, gpt2), got keys {sorted(model.from_config)}"
        )
    _choice(problems, "model.task_type", model.task_type, TASK_TYPES)
    _choice(problems, "model.dtype", model.dtype, MODEL_DTYPES)
    if model.task_type == "sequence_classification":
        if model.num_labels is None or model.num_labels < 2:
            problems.append(
                f"'model.num_labels' must be an int >= 2 for sequence_classification (regression is not supported), got {model.num_labels!r}"
            )
    elif model.num_labels is not None:
        problems.append(
            f"'model.num_labels' is only for sequence_classification, got {model.num_labels!r} with task_type={model.task_type!r}"
        )
    if model.tokenizer is None and model.name_or_path is None:
        problems.append("'model.tokenizer' is required with 'model.from_config' (a tokenizer folder, or \"byte\")")
    if model.quantization is not None:
        _check_quantization(model.quantization, problems)


def _check_quantization(q: dict, problems: list[str]) -> None:
    """``model.quantization``: known BitsAndBytesConfig keys, typed values, exactly one of 4-bit / 8-bit."""
    for key, value in q.items():
        allowed = QUANTIZATION_KEYS.get(key)
        if allowed is None:
            problems.append(f"'model.quantization.{key}' is not a known key; allowed: {sorted(QUANTIZATION_KEYS)}")
        elif isinstance(allowed, tuple):
            _choice(problems, f"model.quantization.{key}", value, allowed)
        elif not _has_type(value, allowed):
            problems.append(f"'model.quantization.{key}' must be a {allowed.__name__}, got {value!r}")
    four, eight = q.get("load_in_4bit") is True, q.get("load_in_8bit") is True
    if four == eight:
        problems.append(
            "'model.quantization' needs exactly one of load_in_4bit: true or load_in_8bit: true, got "
            f"load_in_4bit={q.get('load_in_4bit')!r}, load_in_8bit={q.get('load_in_8bit')!r}"
        )
    if eight and any(k.startswith("bnb_4bit_") for k in q):
        problems.append(f"'model.quantization' bnb_4bit_* keys need load_in_4bit: true, got {sorted(q)}")


def _check_data(data: DataSection, model: ModelSection, problems: list[str]) -> None:
    _choice(problems, "data.mixing", data.mixing, MIX_STRATEGIES)
    if not (math.isfinite(data.temperature) and data.temperature > 0):
        problems.append(f"'data.temperature' must be a finite number > 0, got {data.temperature!r}")
    _at_least(problems, "data.max_length", data.max_length, 1)
    _at_least(problems, "data.num_samples", data.num_samples, 1)
    _at_least(problems, "data.max_eval_examples", data.max_eval_examples, 1)
    _at_least(problems, "data.pad_to_multiple_of", data.pad_to_multiple_of, 1)
    if data.eval_split is not None and not (0 < data.eval_split < 1):
        problems.append(f"'data.eval_split' must be a fraction in (0, 1) or null, got {data.eval_split!r}")
    if data.packing and model.task_type != "causal_lm":
        problems.append(f"'data.packing' packs causal-LM rows; got packing=true with task_type={model.task_type!r}")
    if data.chat_template is not None:
        from molora.training.data.templates import check_chat_template

        problem = check_chat_template(data.chat_template)
        if problem:
            problems.append(f"'data.chat_template' {problem}")


def _check_train(t: TrainSection, problems: list[str]) -> None:
    if not (math.isfinite(t.lr) and t.lr > 0):
        problems.append(f"'train.lr' must be a number > 0, got {t.lr!r}")
    for key in ("router_lr_ratio", "router_lr", "loraplus_lr_ratio", "max_grad_norm"):
        value = getattr(t, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"'train.{key}' must be a number > 0 or null, got {value!r}")
    if not (t.weight_decay >= 0):
        problems.append(f"'train.weight_decay' must be >= 0, got {t.weight_decay!r}")
    for key in ("batch_size", "grad_accum", "max_steps", "log_every"):
        _at_least(problems, f"train.{key}", getattr(t, key), 1)
    for key in ("eval_every", "save_every", "seed", "num_workers"):
        _at_least(problems, f"train.{key}", getattr(t, key), 0)
    for key in ("eval_batch_size", "save_total_limit", "max_eval_batches"):
        _at_least(problems, f"train.{key}", getattr(t, key), 1)
    if isinstance(t.warmup, int) and not isinstance(t.warmup, bool):
        if t.warmup < 0:
            problems.append(
                f"'train.warmup' must be >= 0 steps (an int) or a fraction in [0, 1) (a float), got {t.warmup!r}"
            )
    elif not (0 <= t.warmup < 1):
        problems.append(
            f"'train.warmup' must be >= 0 steps (an int) or a fraction in [0, 1) (a float), got {t.warmup!r}"
        )
    _choice(problems, "train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if not (0 <= t.min_lr_ratio <= 1):
        problems.append(f"'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio!r}")
    _choice(problems, "train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    for i, target in enumerate(t.report_to):
        _choice(problems, f"train.report_to[{i}]", target, REPORT_TO)
    _at_least(problems, "train.eval_samples", t.eval_samples, 0)
    _at_least(problems, "train.eval_sample_tokens", t.eval_sample_tokens, 1)


def _check_cross(model: ModelSection, molora: MoLoRAConfig, data: DataSection, problems: list[str]) -> None:
    _check_adapters(model, molora, data, problems)
    n_tasks = len(data.tasks)
    if molora.router == "task" and molora.num_tasks != n_tasks:
        problems.append(
            f"'molora.num_tasks' must equal the number of data.tasks ({n_tasks}: {list(data.tasks)}), got {molora.num_tasks!r}"
        )
    if molora.task_names is not None and molora.task_names != list(data.tasks):
        problems.append(
            f"'molora.task_names' must be the data.tasks names in order {list(data.tasks)} (or null), got {molora.task_names!r}"
        )


def _has_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def _overridden(key: str, overridden: set[str]) -> bool:
    return any(key == o or key.startswith(o + ".") for o in overridden)


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p))


def _choice(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"'{key}' must be one of {list(allowed)}, got {value!r}")


def _at_least(problems: list[str], key: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        problems.append(f"'{key}' must be >= {low}, got {value!r}")
