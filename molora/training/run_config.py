"""Run configs for ``molora train``: YAML -> dotted overrides -> validated dataclasses.

A run config has four sections that map 1:1 to dataclasses::

    model:   ModelSection    (base model: a path, or ``from_config:`` a dict for a tiny HF config)
    molora:  MoLoRAConfig    (every field of molora.MoLoRAConfig)
    data:    DataSection     (tasks: name -> TaskSpec, mixing, max_length, column names)
    train:   TrainSection    (optimizer, schedule, batch sizes, eval/save intervals, output_dir)

Overrides are ``dotted.key=value`` strings whose value is parsed as YAML
(``train.max_steps=10``, ``molora.target_modules=[q_proj,v_proj]``). The string ``???`` marks
a value the user must give (``model.name_or_path: ???``). Every problem (unknown key, wrong
type, bad value, missing required value) is collected and raised once, as a
:class:`RunConfigError` naming the dotted key, before any model or data is loaded.

Relative data paths written in the YAML file are resolved against the file's folder; those
given as overrides, against the current directory. ``train.output_dir`` is relative to the
current directory.
"""

from __future__ import annotations

import copy
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from molora.core.config import MoLoRAConfig
from molora.training.data.columns import MIX_STRATEGIES

__all__ = [
    "MISSING",
    "DataSection",
    "ModelSection",
    "RunConfig",
    "RunConfigError",
    "TaskSpec",
    "TrainSection",
    "apply_overrides",
    "load_run_config",
    "parse_overrides",
]

MISSING = "???"
TASK_TYPES = ("causal_lm", "sequence_classification")
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
SECTIONS = ("model", "molora", "data", "train")
# Top-level keys that are not sections: ``kind`` marks files of other schemas (demo).
TOP_LEVEL_EXTRA = ("kind",)


class RunConfigError(ValueError):
    """A run config problem; the message lists every problem with its dotted key."""


@dataclass
class ModelSection:
    """The base model.

    Attributes:
        name_or_path: a local transformers model folder (or hub id when online).
        from_config: instead of ``name_or_path``, a dict for ``AutoConfig.for_model``
            (must hold ``model_type``); the model is built with random weights, seeded by
            ``train.seed`` (tests, CI, smoke runs).
        task_type: ``causal_lm`` (AutoModelForCausalLM, prompt/response data) or
            ``sequence_classification`` (AutoModelForSequenceClassification, text/label data).
        num_labels: classes (>= 2) for ``sequence_classification``.
        tokenizer: tokenizer folder; default ``name_or_path``. ``"byte"``: molora's built-in
            byte-level tokenizer (ids 0 pad, 1 bos, 2 eos, 3..258 bytes; needs vocab >= 259).
        dtype: dtype of the loaded base weights ("auto": as saved).
        trust_remote_code: passed to ``from_pretrained``.
        gradient_checkpointing: enable the base model's gradient checkpointing.
        attn_implementation: passed to ``from_pretrained`` / ``from_config`` (e.g. "sdpa").
    """

    name_or_path: str | None = None
    from_config: dict | None = None
    task_type: str = "causal_lm"
    num_labels: int | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None


@dataclass
class TaskSpec:
    """One task's data files and columns (columns default to the ``data`` section's).

    Attributes:
        train: training file (.json/.jsonl/.csv/.parquet).
        eval: evaluation file; a task without one is not evaluated.
        prompt_column, response_column: causal-LM columns.
        text_column, label_column: classification columns.
    """

    train: str | None = None
    eval: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None


@dataclass
class DataSection:
    """Multitask data (see :mod:`molora.training.data`). Task ids follow the order of ``tasks``.

    Attributes:
        tasks: ``{name: TaskSpec}``; a bare string value is the train file.
        mixing: ``size`` | ``equal`` | ``temperature`` (see ``molora.training.data.mix_tasks``).
        temperature: T of temperature mixing.
        num_samples: examples per pass of the mixed stream (default: sum of task sizes).
        max_length: tokens per example.
        prompt_column, response_column, text_column, label_column: default column names.
        max_eval_examples: cap on each task's eval examples.
        pad_to_multiple_of: pad batches to a multiple of this length (fewer distinct shapes).
        cache_dir: ``datasets`` cache for the loaded files (default: its own cache).
    """

    tasks: dict = field(default_factory=dict)
    mixing: str = "size"
    temperature: float = 2.0
    num_samples: int | None = None
    max_length: int = 512
    prompt_column: str = "prompt"
    response_column: str = "response"
    text_column: str = "text"
    label_column: str = "label"
    max_eval_examples: int | None = None
    pad_to_multiple_of: int | None = None
    cache_dir: str | None = None


@dataclass
class TrainSection:
    """The optimization loop (see :mod:`molora.training.loop`).

    Attributes:
        output_dir: the run folder (metrics, checkpoints, final adapter, exports).
        lr: AdamW learning rate of the experts' A (and of everything not listed below).
        router_lr: learning rate of the routers (default ``lr``).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): lr of the B matrices = ratio * lr.
        weight_decay: AdamW weight decay (routers excluded).
        batch_size: examples per device per micro-batch.
        eval_batch_size: examples per device per eval batch (default ``batch_size``).
        grad_accum: micro-batches per optimizer step.
        max_steps: optimizer steps.
        warmup: warm-up steps (an int), or a fraction of ``max_steps`` (a float < 1).
        lr_schedule: ``cosine`` | ``linear`` | ``constant`` after warm-up.
        min_lr_ratio: the cosine/linear schedule ends at ``min_lr_ratio * lr``.
        max_grad_norm: gradient clipping (null: none).
        eval_every: evaluate every this many steps (0: only at the end).
        save_every: checkpoint every this many steps (0: only the final adapter).
        log_every: log the training loss every this many steps.
        save_total_limit: keep only the newest this many checkpoints (null: all).
        max_eval_batches: cap on eval batches per task.
        seed: seeds Python, numpy, torch, data order and ``from_config`` weights.
        mixed_precision: ``auto`` (CUDA: bf16 where supported, else fp16; CPU: fp32; under
            ``accelerate launch --mixed_precision``: the launcher's choice) | ``bf16`` |
            ``fp16`` | ``no``.
        num_workers: DataLoader workers.
        progress_bar: show a tqdm bar (main process only).
        overwrite_output_dir: a fresh run (no --resume) into a folder holding an earlier
            run's checkpoints/metrics deletes them; otherwise it refuses to start.
        export: at the end, export per-task merged PEFT adapters to ``output_dir/export``
            (task router: its tables; other routers: gates measured on each task's eval data).
    """

    output_dir: str = "runs/molora"
    lr: float = 2e-4
    router_lr: float | None = None
    loraplus_lr_ratio: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_steps: int = 1000
    warmup: float = 0.03
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10
    save_total_limit: int | None = None
    max_eval_batches: int | None = None
    seed: int = 0
    mixed_precision: str = "auto"
    num_workers: int = 0
    progress_bar: bool = True
    overwrite_output_dir: bool = False
    export: bool = True


@dataclass
class RunConfig:
    """A whole run: the four sections, plus where the YAML file was."""

    model: ModelSection
    molora: MoLoRAConfig
    data: DataSection
    train: TrainSection
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The four sections as plain YAML-able dicts (resolved paths, defaults filled)."""
        data = asdict(self.data)
        data["tasks"] = {name: _drop_none(asdict(spec)) for name, spec in self.data.tasks.items()}
        return {"model": asdict(self.model), "molora": self.molora.to_dict(), "data": data, "train": asdict(self.train)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


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
    _raise(problems)
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
    _raise(problems)
    return out


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------


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
            raise RunConfigError(f"{path}: the top level must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
        base_dir = path.resolve().parent
    if isinstance(overrides, dict):
        parsed = dict(overrides)
    else:
        parsed = parse_overrides(list(overrides or []))
    raw = apply_overrides(_expand_task_shorthand(raw), parsed)
    config = _build(raw, overridden=set(parsed), base_dir=base_dir)
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


def _build(raw: dict[str, Any], *, overridden: set[str], base_dir: Path) -> RunConfig:
    problems: list[str] = []
    _unknown(raw, list(SECTIONS) + list(TOP_LEVEL_EXTRA), "", problems)
    _find_missing(raw, "", problems)
    sections = {}
    for name in SECTIONS:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            problems.append(f"section '{name}' must be a mapping, got {value!r}")
            value = {}
        sections[name] = value
    model = _to_dataclass(ModelSection, sections["model"], "model", problems)
    train = _to_dataclass(TrainSection, sections["train"], "train", problems)
    data = _build_data(sections["data"], problems, overridden=overridden, base_dir=base_dir)
    molora = _build_molora(sections["molora"], problems)
    if not problems:
        _check_model(model, problems)
        _check_data(data, model, problems)
        _check_train(train, problems)
        _check_cross(model, molora, data, problems)
    _raise(problems)
    return RunConfig(model=model, molora=molora, data=data, train=train)


def _build_molora(raw: dict[str, Any], problems: list[str]) -> MoLoRAConfig | None:
    values = _typed_values(MoLoRAConfig, raw, "molora", problems)
    if values is None:
        return None
    if isinstance(values.get("target_modules"), tuple):
        values["target_modules"] = list(values["target_modules"])
    try:
        return MoLoRAConfig(**values)
    except ValueError as e:
        lines = str(e).splitlines()
        details = [line.strip().removeprefix("- ") for line in lines[1:]] or lines
        problems.extend(f"molora: {d}" for d in details)
        return None


def _build_data(raw: dict[str, Any], problems: list[str], *, overridden: set[str], base_dir: Path) -> DataSection | None:
    raw = dict(raw)
    tasks_raw = raw.pop("tasks", None)
    data = _to_dataclass(DataSection, raw, "data", problems)
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
            problems.append(f"'{key}' must be a file path or a mapping with 'train' (and 'eval', columns), got {spec!r}")
            continue
        task = _to_dataclass(TaskSpec, spec, key, problems)
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


def _check_model(model: ModelSection, problems: list[str]) -> None:
    has_path, has_cfg = model.name_or_path is not None, model.from_config is not None
    if has_path == has_cfg:
        problems.append(
            "'model' needs exactly one of 'model.name_or_path' (a model folder) or 'model.from_config' "
            f"(a dict with model_type), got name_or_path={model.name_or_path!r}, from_config={model.from_config!r}"
        )
    if has_cfg and "model_type" not in model.from_config:
        problems.append(f"'model.from_config' must hold 'model_type' (e.g. llama, gpt2), got keys {sorted(model.from_config)}")
    _choice(problems, "model.task_type", model.task_type, TASK_TYPES)
    _choice(problems, "model.dtype", model.dtype, MODEL_DTYPES)
    if model.task_type == "sequence_classification":
        if model.num_labels is None or model.num_labels < 2:
            problems.append(f"'model.num_labels' must be an int >= 2 for sequence_classification (regression is not supported), got {model.num_labels!r}")
    elif model.num_labels is not None:
        problems.append(f"'model.num_labels' is only for sequence_classification, got {model.num_labels!r} with task_type={model.task_type!r}")
    if model.tokenizer is None and model.name_or_path is None:
        problems.append("'model.tokenizer' is required with 'model.from_config' (a tokenizer folder, or \"byte\")")


def _check_data(data: DataSection, model: ModelSection, problems: list[str]) -> None:
    _choice(problems, "data.mixing", data.mixing, MIX_STRATEGIES)
    if not (math.isfinite(data.temperature) and data.temperature > 0):
        problems.append(f"'data.temperature' must be a finite number > 0, got {data.temperature!r}")
    _at_least(problems, "data.max_length", data.max_length, 1)
    _at_least(problems, "data.num_samples", data.num_samples, 1)
    _at_least(problems, "data.max_eval_examples", data.max_eval_examples, 1)
    _at_least(problems, "data.pad_to_multiple_of", data.pad_to_multiple_of, 1)


def _check_train(t: TrainSection, problems: list[str]) -> None:
    if not (math.isfinite(t.lr) and t.lr > 0):
        problems.append(f"'train.lr' must be a number > 0, got {t.lr!r}")
    for key in ("router_lr", "loraplus_lr_ratio", "max_grad_norm"):
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
            problems.append(f"'train.warmup' must be >= 0 steps (an int) or a fraction in [0, 1) (a float), got {t.warmup!r}")
    elif not (0 <= t.warmup < 1):
        problems.append(f"'train.warmup' must be >= 0 steps (an int) or a fraction in [0, 1) (a float), got {t.warmup!r}")
    _choice(problems, "train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if not (0 <= t.min_lr_ratio <= 1):
        problems.append(f"'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio!r}")
    _choice(problems, "train.mixed_precision", t.mixed_precision, MIXED_PRECISION)


def _check_cross(model: ModelSection, molora: MoLoRAConfig, data: DataSection, problems: list[str]) -> None:
    n_tasks = len(data.tasks)
    if molora.router == "task" and molora.num_tasks != n_tasks:
        problems.append(f"'molora.num_tasks' must equal the number of data.tasks ({n_tasks}: {list(data.tasks)}), got {molora.num_tasks!r}")
    if molora.task_names is not None and molora.task_names != list(data.tasks):
        problems.append(f"'molora.task_names' must be the data.tasks names in order {list(data.tasks)} (or null), got {molora.task_names!r}")


# --------------------------------------------------------------------------------------
# Generic typed conversion
# --------------------------------------------------------------------------------------


def _to_dataclass(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]):
    values = _typed_values(cls, raw, prefix, problems)
    return None if values is None else cls(**values)


def _typed_values(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any] | None:
    """Check ``raw``'s keys against ``cls``'s fields and each value against its annotation."""
    if not isinstance(raw, dict):
        problems.append(f"'{prefix}' must be a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name != "source"]
    n_before = len(problems)
    _unknown(raw, names, prefix, problems)
    values = {}
    for key, value in raw.items():
        if key not in names or value == MISSING:
            continue
        ok, converted = _convert(value, hints[key])
        if ok:
            values[key] = converted
        else:
            problems.append(f"'{prefix}.{key}' must be {_describe(hints[key])}, got {value!r}")
    return values if len(problems) == n_before else None


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``hint``): ints widen to floats, numeric strings to numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _convert(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, value if isinstance(value, int) else float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, c = _convert(v, item)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is dict or origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))


def _unknown(raw: dict[str, Any], known: list[str], prefix: str, problems: list[str]) -> None:
    for key in raw:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"unknown key '{dotted}'; known: {sorted(known)}")


def _find_missing(raw: Any, prefix: str, problems: list[str]) -> None:
    if isinstance(raw, dict):
        for key, value in raw.items():
            _find_missing(value, f"{prefix}.{key}" if prefix else str(key), problems)
    elif raw == MISSING:
        problems.append(f"missing required value '{prefix}' (it is {MISSING!r} in the config): set it, e.g. {prefix}=...")


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


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _raise(problems: list[str]) -> None:
    if problems:
        if len(problems) == 1:
            raise RunConfigError(f"invalid run config: {problems[0]}")
        raise RunConfigError("invalid run config:\n  - " + "\n  - ".join(problems))
