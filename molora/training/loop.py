"""The multitask training loop on ``accelerate``: one code path for a single process, DDP and
FSDP (``accelerate launch``).

``train(config)`` builds the tokenizer, the per-task data (tokenized per task, then mixed
with ``molora.training.data.mix_tasks``), the base model and its MoLoRA wrapper, and runs AdamW with
separate learning rates for routers and for the experts' B (LoRA+), warm-up then a
cosine/linear/constant schedule, gradient accumulation and mixed precision. It writes to
``train.output_dir``:

- ``run_config.yaml``: the resolved config.
- ``metrics.jsonl``: one JSON object per line: ``{"type": "train", "step", "loss", "aux_loss",
  "lr", ...}`` and ``{"type": "eval", "step", "tasks": {task: {"loss", "accuracy",
  "examples", "tokens"}}, "routing": {task: {layer: {"load": [N], "gates": [N],
  "tokens"}}}}``. Eval loss is the mean cross-entropy over supervised tokens (causal LM) or
  examples (classification), without the router losses; accuracy is next-token accuracy on
  the supervised tokens, or classification accuracy.
- ``checkpoints/step_XXXXXXX/``: ``adapter/`` (``save_pretrained``), ``optimizer.pt`` (under
  FSDP ``optimizer_rank<r>.pt``), ``scheduler.pt``, ``rng_rank<r>.pt``,
  ``trainer_state.json``; written to a temporary
  folder and renamed, so an interrupted save leaves the previous checkpoints intact.
  ``resume=True`` continues from the newest one (the same losses as an uninterrupted run:
  the data order is a function of the seed and the number of batches consumed).
- ``final/``: the final adapter; ``export/``: per-task merged PEFT adapters (when
  ``molora.merge.export`` is importable); ``summary.json``.

Checkpoint state files are read with ``torch.load(weights_only=True)``: no arbitrary pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from molora.atomic import atomic_directory, atomic_write_text
from molora.model import MoLoRAModel, get_molora_model
from molora.training.data import (
    IGNORE_INDEX,
    MultitaskCollator,
    load_task_datasets,
    mix_tasks,
    tokenize_causal_lm,
    tokenize_classification,
)
from molora.training.run_config import RunConfig

__all__ = ["build_byte_tokenizer", "lr_factor", "param_groups", "train"]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def build_byte_tokenizer():
    """A byte-level tokenizer that needs no files: ids 0 <pad>, 1 <s> (prepended), 2 </s>,
    3 + b for byte b (vocab 259). For tiny models built from config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2's reversible byte -> printable unicode map, so that BPE sees one symbol per byte.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chars[b]: 3 + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _load_tokenizer(config: RunConfig):
    source = config.model.tokenizer or config.model.name_or_path
    if source == "byte":
        tokenizer = build_byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {source!r} has neither a pad nor an eos token; give model.tokenizer one that does")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_base_model(config: RunConfig, tokenizer) -> torch.nn.Module:
    import transformers

    m = config.model
    auto = transformers.AutoModelForCausalLM if m.task_type == "causal_lm" else transformers.AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {}
    if m.num_labels is not None:
        kwargs["num_labels"] = m.num_labels
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    dtype = None if m.dtype == "auto" else getattr(torch, m.dtype)
    if m.from_config is not None:
        cfg = dict(m.from_config)
        hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg, **kwargs)
        model = auto.from_config(hf_config, dtype=dtype or torch.float32)
    else:
        model = auto.from_pretrained(m.name_or_path, dtype=dtype or "auto", trust_remote_code=m.trust_remote_code, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token with it
    return model


def _check_files(config: RunConfig) -> None:
    """Every data file exists (before any model is loaded)."""
    missing = [
        f"data.tasks.{name}.{which}={getattr(spec, which)!r}"
        for name, spec in config.data.tasks.items()
        for which in ("train", "eval")
        if getattr(spec, which) is not None and not Path(getattr(spec, which)).is_file()
    ]
    if missing:
        raise FileNotFoundError("data files not found: " + ", ".join(missing))


def _tokenize(ds, spec, config: RunConfig, tokenizer):
    d = config.data
    if config.model.task_type == "causal_lm":
        return tokenize_causal_lm(
            ds,
            tokenizer,
            prompt_column=spec.prompt_column or d.prompt_column,
            response_column=spec.response_column or d.response_column,
            max_length=d.max_length,
        )
    return tokenize_classification(
        ds, tokenizer, text_column=spec.text_column or d.text_column, label_column=spec.label_column or d.label_column, max_length=d.max_length
    )


def _build_data(config: RunConfig, tokenizer):
    """(mixed training Dataset with task_ids, {task: eval Dataset with task_ids})."""
    tasks, d = config.data.tasks, config.data
    raw, task_to_id = load_task_datasets({n: s.train for n, s in tasks.items()}, cache_dir=d.cache_dir)
    tokenized = {n: _tokenize(raw[n], tasks[n], config, tokenizer) for n in tasks}
    mixed = mix_tasks(tokenized, strategy=d.mixing, temperature=d.temperature, num_samples=d.num_samples, seed=config.train.seed, task_to_id=task_to_id)
    evals = {}
    for name, spec in tasks.items():
        if spec.eval is None:
            continue
        ds, _ = load_task_datasets({name: spec.eval}, cache_dir=d.cache_dir)
        ds = _tokenize(ds[name], spec, config, tokenizer)
        if d.max_eval_examples is not None:
            ds = ds.select(range(min(d.max_eval_examples, len(ds))))
        evals[name] = ds.add_column("task_ids", [task_to_id[name]] * len(ds))
    return mixed, evals


class _EpochSampler(Sampler):
    """A fresh permutation of ``range(n)`` each epoch, a pure function of (seed, epoch), so
    that a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def param_groups(model: MoLoRAModel, *, lr: float, router_lr: float | None, loraplus_lr_ratio: float | None, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: experts' A (and modules_to_save) at ``lr``; experts' B at
    ``loraplus_lr_ratio * lr`` (LoRA+, Hayou et al. 2024); routers at ``router_lr`` without
    weight decay. Empty groups are left out; each group has a ``name``."""
    groups: dict[str, list] = {"base": [], "lora_B": [], "router": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".router." in name:
            groups["router"].append(param)
        elif name.endswith("lora_B"):
            groups["lora_B"].append(param)
        else:
            groups["base"].append(param)
    settings = {
        "base": (lr, weight_decay),
        "lora_B": (lr * (loraplus_lr_ratio or 1.0), weight_decay),
        "router": (router_lr or lr, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items()
        if params
    ]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from 0, then cosine/linear
    decay to ``min_lr_ratio`` at ``max_steps`` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def _mixed_precision(choice: str) -> str | None:
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # `accelerate launch --mixed_precision` decides
    if torch.cuda.is_available():
        # fp16 needs loss scaling (accelerate's GradScaler) and fp32 master weights: the
        # adapter is float32 by default (MoLoRAConfig.adapter_dtype), so both are in place.
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _example_stats(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, ...]:
    """Per example: (loss sum, counted targets, correct), each (batch,)."""
    if causal:
        labels = labels[:, 1:]  # (B, L-1): token t predicts token t+1
        mask = labels != IGNORE_INDEX
        # One example at a time: a float32 copy of (B, L, V) logits is gigabytes at LLM vocab sizes.
        ce = torch.stack([
            F.cross_entropy(logits[i, :-1].float(), labels[i], ignore_index=IGNORE_INDEX, reduction="sum") for i in range(labels.shape[0])
        ])  # (B,)
        correct = (logits[:, :-1].argmax(-1) == labels) & mask  # (B, L-1)
        return ce, mask.sum(1).float(), correct.sum(1).float()
    logits = logits.float()  # (B, C)
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    return ce, torch.ones_like(ce), (logits.argmax(-1) == labels).float()


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict[str, DataLoader], *, causal: bool) -> dict[str, Any]:
    """Per-task loss/accuracy and per-task, per-layer expert load, reduced over processes.

    Returns:
        ``{"tasks": {task: {"loss", "accuracy", "examples", "tokens"}}, "routing": {task:
        {layer: {"load": [N], "gates": [N], "tokens": int}}}}``.
    """
    inner: MoLoRAModel = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    inner.track_routing_stats = True
    tasks, routing = {}, {}
    try:
        for name, loader in loaders.items():
            inner.reset_routing_stats()
            sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, targets, correct, examples
            for batch in loader:
                out = model(**batch)
                stats = _example_stats(out.logits, batch["labels"], causal)
                stats = accelerator.gather_for_metrics(tuple(s.double() for s in stats))
                sums += torch.stack([s.sum() for s in stats] + [torch.tensor(float(stats[0].numel()), device=sums.device, dtype=sums.dtype)])
            loss, count, correct, examples = sums.tolist()
            tasks[name] = {
                "loss": loss / max(count, 1),
                "accuracy": correct / max(count, 1),
                "examples": int(examples),
                "tokens": int(count),
            }
            routing[name] = _reduce_routing(accelerator, inner.routing_stats())
    finally:
        inner.track_routing_stats = False
        model.train(was_training)
    return {"tasks": tasks, "routing": routing}


def _reduce_routing(accelerator, stats: dict[str, dict]) -> dict[str, dict]:
    """Sum token counts and token-weighted loads over processes; back to fractions."""
    out = {}
    for layer, s in stats.items():
        tokens = torch.tensor([float(s["tokens"])], dtype=torch.float64)
        packed = torch.cat([tokens, s["load"].double() * s["tokens"], s["gates"].double() * s["tokens"]]).to(accelerator.device)
        packed = accelerator.reduce(packed, reduction="sum").cpu()
        n = len(s["load"])
        total = max(packed[0].item(), 1.0)
        out[layer] = {
            "load": (packed[1 : 1 + n] / total).tolist(),
            "gates": (packed[1 + n :] / total).tolist(),
            "tokens": int(packed[0].item()),
        }
    return out


# --------------------------------------------------------------------------------------
# Checkpoints and metrics
# --------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _optimizer_file(accelerator) -> str:
    """FSDP shards the optimizer state: one file per rank; otherwise one shared file."""
    return f"optimizer_rank{accelerator.process_index}.pt" if _sharded(accelerator) else "optimizer.pt"


def save_adapter(accelerator, model, path: Path) -> None:
    """``save_pretrained`` of the unwrapped model on the main process (all ranks call).

    Under FSDP (v1) the parameters are gathered first (``summon_full_params``); FSDP2
    (``fully_shard``) is not supported yet and raises.
    """
    if _sharded(accelerator):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(model, FSDP):
            raise NotImplementedError("saving MoLoRA adapters under FSDP2 (fully_shard) is not supported yet: use FSDP v1 or DDP")
        with FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=True):
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(path)
    elif accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict[str, Any], output_dir: Path, *, keep: int | None) -> Path:
    """Write a checkpoint into a temporary folder, then rename it into place (all ranks call)."""
    final = output_dir / CHECKPOINTS / f"step_{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_adapter(accelerator, model, tmp / "adapter")
    if accelerator.is_main_process or _sharded(accelerator):
        torch.save(optimizer.state_dict(), tmp / _optimizer_file(accelerator))
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep is not None:
            for old in _checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_fresh(accelerator, output_dir: Path, *, overwrite: bool) -> None:
    """A fresh run must not mix its files with an earlier run's (unless asked to clear it)."""
    accelerator.wait_for_everyone()  # every rank looks before the main one deletes anything
    old = [output_dir / n for n in (CHECKPOINTS, METRICS, "final", "export", "summary.json") if (output_dir / n).exists()]
    if not old:
        return
    if not overwrite:
        raise FileExistsError(
            f"train.output_dir={str(output_dir)!r} holds an earlier run ({', '.join(p.name for p in old)}): "
            "continue it with --resume, choose another train.output_dir, or set train.overwrite_output_dir=true"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def _resolve_resume(resume: bool | str | os.PathLike, output_dir: Path) -> Path:
    if resume is True:
        found = _checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {str(output_dir / CHECKPOINTS)!r}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"--resume {str(path)!r}: not a checkpoint folder ({STATE} missing)")
    return path


class _MetricsLog:
    """Append-only JSONL log (main process only)."""

    def __init__(self, path: Path, enabled: bool, *, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.exists():
            # Resuming: drop what the interrupted run logged after the checkpoint, atomically.
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= keep_until]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train(config: RunConfig, *, resume: bool | str | os.PathLike | None = None) -> dict[str, Any]:
    """Train a MoLoRA model as ``config`` says (see the module docstring for the outputs).

    Args:
        config: a validated :class:`~molora.training.run_config.RunConfig`.
        resume: ``True``: continue from the newest checkpoint in ``output_dir``; a path:
            from that checkpoint folder; ``None``/``False``: start fresh.

    Returns:
        The run summary (also written to ``output_dir/summary.json``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    _check_files(config)
    t, tasks = config.train, list(config.data.tasks)
    if config.molora.task_names is None:
        config = dataclasses.replace(config, molora=dataclasses.replace(config.molora, task_names=tasks))
    output_dir = Path(t.output_dir)
    # Several processes and no GPU (torchrun / `accelerate launch --multi_gpu` on a CPU box):
    # accelerate only picks its CPU backend (gloo) when told to run on CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # train() may run several times in one process (notebooks, tests) with other precisions:
    # start from a fresh AcceleratorState, keeping the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=_mixed_precision(t.mixed_precision), cpu=multi_cpu)
    main = accelerator.is_main_process
    ckpt = _resolve_resume(resume, output_dir) if resume else None
    if ckpt is None:
        _check_fresh(accelerator, output_dir, overwrite=t.overwrite_output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "run_config.yaml", config.to_yaml())
    set_seed(t.seed)
    tokenizer = _load_tokenizer(config)
    with accelerator.main_process_first():
        train_ds, eval_sets = _build_data(config, tokenizer)
    collator = MultitaskCollator.from_tokenizer(tokenizer, pad_to_multiple_of=config.data.pad_to_multiple_of)

    base = _load_base_model(config, tokenizer)
    if config.model.from_config is not None:
        # A model built from config has no weights anywhere else: keep them with the run, so
        # that adapters, exports and `molora export RUN` can name and reload their base.
        base_dir = (output_dir / "base_model").resolve()
        if ckpt is not None and (base_dir / "config.json").is_file():
            base = type(base).from_pretrained(base_dir, dtype=base.dtype)  # exactly the run's base
        elif main:
            with atomic_directory(base_dir) as tmp:
                base.save_pretrained(tmp)
        base.config.name_or_path = str(base_dir)
    if ckpt is not None:
        model = MoLoRAModel.from_pretrained(base, ckpt / "adapter", is_trainable=True)
        if model.molora_config.to_dict() != config.molora.to_dict():
            raise ValueError(f"--resume: the checkpoint's molora config differs from the run config's: {_dict_diff(model.molora_config.to_dict(), config.molora.to_dict())}")
    else:
        model = get_molora_model(base, config.molora)
    model.track_routing_stats = False  # only eval collects routing statistics
    if config.model.gradient_checkpointing:
        # on the wrapper: it also makes the inputs require grad, so experts behind the frozen
        # embeddings get gradients; non-reentrant checkpointing is the one torch recommends
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = model.get_nb_trainable_parameters()

    optimizer = torch.optim.AdamW(param_groups(model, lr=t.lr, router_lr=t.router_lr, loraplus_lr_ratio=t.loraplus_lr_ratio, weight_decay=t.weight_decay))
    warmup = t.warmup if isinstance(t.warmup, int) else int(round(t.warmup * t.max_steps))
    schedule = functools.partial(lr_factor, warmup_steps=warmup, max_steps=t.max_steps, schedule=t.lr_schedule, min_lr_ratio=t.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    sampler = _EpochSampler(len(train_ds), t.seed)
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, collate_fn=collator, drop_last=True, num_workers=t.num_workers)
    eval_bs = t.eval_batch_size or t.batch_size
    eval_loaders = {}
    for name, ds in eval_sets.items():
        if t.max_eval_batches is not None:
            ds = ds.select(range(min(len(ds), t.max_eval_batches * eval_bs * accelerator.num_processes)))
        eval_loaders[name] = DataLoader(ds, batch_size=eval_bs, collate_fn=collator, num_workers=t.num_workers)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would
    # step it once per process).
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {n: accelerator.prepare_data_loader(dl) for n, dl in eval_loaders.items()}
    if len(train_loader) == 0:
        raise ValueError(
            f"the mixed training data has {len(train_ds)} examples, fewer than train.batch_size={t.batch_size} "
            f"x {accelerator.num_processes} processes: lower the batch size or add data"
        )

    step, micro = 0, 0
    if ckpt is not None:
        state = json.loads((ckpt / STATE).read_text())
        if state["world_size"] != accelerator.num_processes or state["batch_size"] != t.batch_size:
            accelerator.print(f"warning: resuming with another world size / batch size than {ckpt}: the data order differs from an uninterrupted run")
        optimizer.load_state_dict(torch.load(ckpt / _optimizer_file(accelerator), weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        step, micro = state["step"], state["micro_step"]
        if step >= t.max_steps:
            raise ValueError(f"--resume: checkpoint {ckpt} is at step {step} >= train.max_steps={t.max_steps}; raise train.max_steps to train on")
        accelerator.print(f"resumed from {ckpt} at step {step}")
    log = _MetricsLog(output_dir / METRICS, main, keep_until=step if ckpt is not None else None)
    if main and ckpt is None:
        (output_dir / METRICS).unlink(missing_ok=True)
        accelerator.print(f"trainable params: {trainable:,d} || all params: {total:,d} || tasks: {tasks}")

    def batches():
        epoch, skip = divmod(micro, len(train_loader))
        while True:
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            loader.set_epoch(epoch)
            yield from loader
            epoch, skip = epoch + 1, 0

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "micro_step": micro, "world_size": accelerator.num_processes, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seed": t.seed}

    def run_eval() -> dict[str, Any] | None:
        if not eval_loaders:
            return None
        result = evaluate(accelerator, model, eval_loaders, causal=config.model.task_type == "causal_lm")
        log.write({"type": "eval", "step": step, **result})
        summary = ", ".join(f"{n}: loss {r['loss']:.4f} acc {r['accuracy']:.3f}" for n, r in result["tasks"].items())
        accelerator.print(f"step {step} eval | {summary}")
        return result

    inner: MoLoRAModel = accelerator.unwrap_model(model)
    stream = batches()
    bar = tqdm(total=t.max_steps, initial=step, disable=not (main and t.progress_bar), desc="train", dynamic_ncols=True)
    started, last_eval, last_loss = time.time(), None, None
    model.train()
    window, window_steps = torch.zeros(2, device=accelerator.device), 0  # summed loss, aux since the last log
    while step < t.max_steps:
        for k in range(t.grad_accum):
            batch = next(stream)
            micro += 1
            sync = contextlib.nullcontext() if k == t.grad_accum - 1 else accelerator.no_sync(model)
            with sync:
                out = model(**batch)
                accelerator.backward(out.loss / t.grad_accum)
            window[0] += out.loss.detach().float() / t.grad_accum
            window[1] += inner.aux_loss().detach().float() / t.grad_accum
        if t.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}  # the lr of this step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, window_steps = step + 1, window_steps + 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.max_steps:
            loss, aux = (accelerator.reduce(window, reduction="mean") / window_steps).tolist()
            window.zero_()
            window_steps = 0
            last_loss = loss
            log.write({"type": "train", "step": step, "loss": loss, "aux_loss": aux, **lrs, "epoch": micro / len(train_loader), "time": time.time() - started})
            bar.set_postfix(loss=f"{loss:.4f}")
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            last_eval = run_eval()
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            save_checkpoint(accelerator, model, optimizer, scheduler, trainer_state(), output_dir, keep=t.save_total_limit)
    bar.close()
    last_eval = run_eval() or last_eval
    accelerator.wait_for_everyone()

    summary = {
        "steps": step,
        "tasks": tasks,
        "final_train_loss": last_loss,
        "final_eval": None if last_eval is None else last_eval["tasks"],
        "trainable_params": trainable,
        "total_params": total,
        "router": config.molora.router,
        "num_experts": config.molora.num_experts,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "wall_time_s": time.time() - started,
        "config": config.source,
    }
    save_adapter(accelerator, model, output_dir / "final")
    if main:
        summary["export"] = _export(inner, config, eval_sets, collator, output_dir / "export", accelerator.device, sharded=_sharded(accelerator))
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        accelerator.print(f"done: {step} steps; adapter in {output_dir / 'final'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _export(model: MoLoRAModel, config: RunConfig, eval_sets, collator, path: Path, device, *, sharded: bool = False) -> str | None:
    """Per-task merged PEFT adapters: the task router's tables, or gates measured per task."""
    if not config.train.export:
        return None
    if sharded:
        print(f"export skipped under FSDP: export the adapter in {path.parent / 'final'} with `molora export`")
        return None
    try:
        from molora.merge import export
    except ImportError as e:
        print(f"export skipped: molora.merge.export is not importable ({e})")
        return None
    if config.molora.router == "task":
        model.export_merged_adapter(path, task="all")
        return str(path)
    if not eval_sets:
        print("export skipped: per-task gates are measured on eval data and no task has an eval file")
        return None

    def batches():
        for ds in eval_sets.values():
            for batch in DataLoader(ds, batch_size=config.train.eval_batch_size or config.train.batch_size, collate_fn=collator):
                batch.pop("labels", None)
                yield {k: v.to(device) for k, v in batch.items()}

    model.track_routing_stats = False
    gates = export.measure_gates(model, batches(), by_task=True)
    model.export_merged_adapter(path, weights=gates, task="all")
    return str(path)


def _dict_diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
