"""The run config's schema: four sections that map 1:1 to dataclasses (``model``, ``molora``,
``data``, ``train``), the ``RunConfig`` that holds them, the allowed values of the string
choices, and the error that lists every problem at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from molora.core.config import MoLoRAConfig

__all__ = [
    "MISSING",
    "DataSection",
    "ModelSection",
    "RunConfig",
    "RunConfigError",
    "TaskSpec",
    "TrainSection",
    "raise_problems",
]

MISSING = "???"
TASK_TYPES = ("causal_lm", "sequence_classification")
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
# model.quantization: the BitsAndBytesConfig keys a run config may set, with their allowed values
# (a tuple of choices, or a type)
QUANTIZATION_KEYS: dict[str, Any] = {
    "load_in_4bit": bool,
    "load_in_8bit": bool,
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "bnb_4bit_use_double_quant": bool,
    "bnb_4bit_quant_storage": ("uint8", "bfloat16", "float16", "float32"),
    "llm_int8_threshold": float,
    "llm_int8_skip_modules": list,
}
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
REPORT_TO = ("tensorboard",)
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
        quantization: QLoRA: load the base with bitsandbytes, e.g. ``{load_in_4bit: true,
            bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}`` or ``{load_in_8bit:
            true}`` (keys of ``transformers.BitsAndBytesConfig``, see ``QUANTIZATION_KEYS``),
            then prepare it as PEFT's ``prepare_model_for_kbit_training``. A ``from_config``
            base is built, kept in the run folder, and reloaded quantized. Needs
            ``pip install 'molora[qlora]'``.
        from_adapters: start the experts from existing PEFT LoRA adapters of this base model
            (``MoLoRAModel.from_lora_adapters``): a list of adapter folders (expert i = entry
            i), or ``{task name: folder}`` with one entry per ``data.tasks`` name (expert i =
            the adapter of task i, in data.tasks order; with ``molora.router: task`` task i
            then starts routed to its own adapter). ``molora.num_experts`` must equal the
            number of adapters. Relative paths resolve against the YAML file's folder.
        freeze_experts: with ``from_adapters``: keep the adapters' weights (only routers,
            shared experts and modules_to_save train; default true), or train them too (false).
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
    quantization: dict | None = None
    from_adapters: list[str] | dict[str, str] | None = None
    freeze_experts: bool = True


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
        chat_template: for ``messages`` rows, when the tokenizer has no chat template: a name
            (``molora.training.data.templates.CHAT_TEMPLATES``: chatml, llama3, zephyr, ...) or
            a Jinja template string. The tokenizer's own template wins when it has one.
        eval_split: a fraction in (0, 1): each task without an ``eval`` file gives this share of
            its training rows (seeded by ``train.seed``, at least one row) to its eval set.
        packing: concatenate the tokenized rows of one task into sequences of up to
            ``max_length`` tokens (causal LM); attention and positions restart at each row.
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
    chat_template: str | None = None
    eval_split: float | None = None
    packing: bool = False


@dataclass
class TrainSection:
    """The optimization loop (see :mod:`molora.training.loop`).

    Attributes:
        output_dir: the run folder (metrics, checkpoints, final adapter, exports).
        lr: AdamW learning rate of the experts' A (and of everything not listed below).
        router_lr_ratio: router lr = ratio * ``lr``. Default (null): the router kind's
            default, :data:`molora.core.recipes.ROUTER_LR_RATIO` (task 20, soft/topk/topp 5):
            a router at the experts' lr barely leaves uniform routing (DESIGN §5).
        router_lr: an absolute learning rate of the routers; when set, it wins over
            ``router_lr_ratio`` (default null).
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
        save_every: checkpoint every this many steps and at the last step, so that a finished
            run can be resumed with a higher ``max_steps`` (0: no checkpoints, only the final adapter).
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
            Skipped under FSDP2: ``molora export OUTPUT_DIR`` exports the final adapter.
        fsdp: shard the model over the processes with FSDP2 (``fully_shard`` per decoder
            layer, experts and routers with their layer; optimizer state sharded too) instead
            of DDP. Needs several processes (``accelerate launch --multi_gpu`` or torchrun);
            one process trains unsharded.
        report_to: where scalars go besides ``metrics.jsonl``: ``[tensorboard]`` writes them
            with ``torch.utils.tensorboard`` to ``output_dir/tensorboard``.
        eval_samples: at each eval, greedy completions of this many eval prompts per task
            (causal LM), logged to ``samples.jsonl`` (and tensorboard text); 0: none.
        eval_sample_tokens: new tokens per eval sample.
    """

    output_dir: str = "runs/molora"
    lr: float = 2e-4
    router_lr_ratio: float | None = None
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
    fsdp: bool = False
    report_to: list[str] = field(default_factory=list)
    eval_samples: int = 0
    eval_sample_tokens: int = 64


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


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`RunConfigError` listing every problem (nothing when there is none)."""
    if problems:
        if len(problems) == 1:
            raise RunConfigError(f"invalid run config: {problems[0]}")
        raise RunConfigError("invalid run config:\n  - " + "\n  - ".join(problems))
