"""The multitask training loop on ``accelerate``: one code path for a single process, DDP and
FSDP2 (``accelerate launch`` or torchrun; ``train.fsdp``: :mod:`molora.training.distributed`).

``train(config)`` builds the tokenizer, the per-task data, the base model and its MoLoRA wrapper,
and runs AdamW (routers and LoRA+ B at their own lr), warm-up then a schedule, gradient
accumulation and mixed precision. It writes to ``train.output_dir`` (:mod:`molora.training.run_dir`):

- ``run_config.yaml``; ``metrics.jsonl``: train (with tokens/s and ETA), routing-health
  (:mod:`molora.training.health`: warns once when routing stays uniform or collapses) and eval
  records, also sent to TensorBoard with ``train.report_to`` (:mod:`molora.training.reporting`);
  ``samples.jsonl``: greedy eval completions (``train.eval_samples``).
- ``checkpoints/step_XXXXXXX/`` (:mod:`molora.training.checkpoints`); ``resume=True`` continues
  from the newest one with the current config's lr and schedule (:mod:`molora.training.resume`).
- ``base_model/`` (a model built from config), ``final/``, ``export/`` (:mod:`molora.training.export`)
  and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from molora.atomic import atomic_write_text
from molora.core.routing_health import RoutingHealthMonitor
from molora.inject import find_target_modules
from molora.merge.from_peft import freeze_experts
from molora.model import MoLoRAModel, get_molora_model
from molora.training.base_model import check_positions, check_vocab, keep_base_with_run, load_base_model, prepare_quantized_base
from molora.training.checkpoints import load_checkpoint_model, load_training_state, save_adapter, save_checkpoint
from molora.training.data import MultitaskCollator
from molora.training.distributed import check_launcher, is_sharded, make_accelerator, no_sync, shard_model
from molora.training.evaluation import evaluate
from molora.training.divergence import check_step_finite, check_weights_finite, warn_scaling
from molora.training.health import TRAIN_HINT, health_record
from molora.training.export import export_per_task
from molora.training.loaders import build_datasets, build_loaders, check_files
from molora.training.metrics import MetricsLog
from molora.training.objective import count_targets, micro_batch_loss
from molora.training.optim import build_optimizer
from molora.training.quiet import library_progress
from molora.training.reporting import eta_seconds, input_tokens, lr_text, make_sinks, speed_text
from molora.training.resume import SCHEDULE_FIELDS, logged_so_far
from molora.training.run_config import RunConfig
from molora.training.run_dir import EXPORT, FINAL, METRICS, RUN_CONFIG, SUMMARY, check_fresh, resolve_resume, run_lock
from molora.training.samples import SAMPLES, eval_samples
from molora.training.tokenizer import load_tokenizer

__all__ = ["train"]


@dataclasses.dataclass
class _Run:
    """What the steps of one run share: the prepared objects and the progress counters."""

    config: RunConfig
    accelerator: Any
    output_dir: Path
    model: torch.nn.Module  # prepared by accelerate (possibly DDP-wrapped), or sharded in place (FSDP2)
    inner: MoLoRAModel  # the same model, unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    log: MetricsLog | None = None
    health: RoutingHealthMonitor | None = None  # routing-health warnings (main process)
    samples_log: MetricsLog | None = None
    tokenizer: Any = None
    eval_sets: dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0  # optimizer steps taken
    micro: int = 0  # micro-batches consumed (the data position)
    started: float = 0.0
    start_step: int = 0  # the step this process started (or resumed) at: the ETA's rate
    logged_at: float = 0.0  # time of the last train record: the tokens/s window
    tokens_per_s: float | None = None
    last_loss: float | None = None
    last_eval: dict[str, Any] | None = None
    eval_step: int | None = None  # the step of last_eval
    max_grad_accum: int = 1  # the largest grad_accum of the run so far (checks a resumed micro_step)


def train(config: RunConfig, *, resume: bool | str | os.PathLike | None = None) -> dict[str, Any]:
    """Train a MoLoRA model as ``config`` says (see the module docstring for the outputs).

    Args:
        config: a validated :class:`~molora.training.run_config.RunConfig`.
        resume: ``True``: continue from the newest checkpoint in ``output_dir``; a path:
            from that checkpoint folder; ``None``/``False``: start fresh.

    Returns:
        The run summary (also written to ``output_dir/summary.json``).

    Raises:
        FolderBusyError: another process is writing ``train.output_dir`` (a second run).
    """
    check_files(config)
    if config.molora.task_names is None:
        config = dataclasses.replace(
            config, molora=dataclasses.replace(config.molora, task_names=list(config.data.tasks))
        )
    output_dir = Path(config.train.output_dir)
    accelerator = make_accelerator(config.train.mixed_precision)
    check_launcher(accelerator, fsdp=config.train.fsdp)
    with run_lock(accelerator, output_dir):
        return _train_locked(config, accelerator, output_dir, resume)


def _train_locked(config: RunConfig, accelerator, output_dir: Path, resume) -> dict[str, Any]:
    """:func:`train` while holding the run folder's lock."""
    from accelerate.utils import set_seed

    ckpt = _start_run_dir(accelerator, config, output_dir, resume)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config)
    with library_progress(config.train.progress_bar and accelerator.is_main_process):  # one bar, on rank 0
        with accelerator.main_process_first():
            train_ds, eval_sets = build_datasets(config, tokenizer)
        model = _build_model(config, tokenizer, output_dir, ckpt=ckpt, main=accelerator.is_main_process)
    collator = MultitaskCollator.from_tokenizer(tokenizer, pad_to_multiple_of=config.data.pad_to_multiple_of)
    warn_scaling(accelerator, model)
    trainable, total = model.get_nb_trainable_parameters()
    run = _prepare(accelerator, config, output_dir, model, train_ds, eval_sets, collator)
    run.tokenizer, run.eval_sets = tokenizer, eval_sets
    _restore(run, ckpt)
    if accelerator.is_main_process and ckpt is None:
        accelerator.print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || tasks: {list(config.data.tasks)}"
        )
    _train_steps(run)
    if run.eval_step != run.step:  # a resumed finished run may have its final eval already
        run.last_eval = _run_eval(run) or run.last_eval
    accelerator.wait_for_everyone()
    summary = _summary(run, trainable=trainable, total=total)
    _save_final(run, summary, eval_sets, collator)
    return summary


def _start_run_dir(accelerator, config: RunConfig, output_dir: Path, resume) -> Path | None:
    """The checkpoint to resume from (None: a fresh run, in a folder without an earlier run); writes the resolved config."""
    ckpt = resolve_resume(resume, output_dir) if resume else None
    if ckpt is None:
        check_fresh(accelerator, output_dir, overwrite=config.train.overwrite_output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / RUN_CONFIG, config.to_yaml())
    return ckpt


def _build_model(config: RunConfig, tokenizer, output_dir: Path, *, ckpt: Path | None, main: bool) -> MoLoRAModel:
    """The base model wrapped with MoLoRA: the checkpoint's adapter when resuming, else a fresh one."""
    base = load_base_model(config, tokenizer)
    check_vocab(base, tokenizer, config)
    check_positions(base, config.data.max_length, print if main else lambda text: None)
    find_target_modules(base, config.molora.target_modules)  # a typo fails before anything is written
    if config.model.from_config is not None:
        base = keep_base_with_run(base, output_dir, resuming=ckpt is not None, main=main)
    base = prepare_quantized_base(base, config)  # QLoRA (model.quantization), else unchanged
    adapters = config.model.from_adapters
    if ckpt is not None:
        model = load_checkpoint_model(base, ckpt, config.molora)
        if adapters is not None and config.model.freeze_experts:
            freeze_experts(model)  # as the interrupted run: its optimizer holds no expert state
    elif adapters is not None:
        paths = [adapters[t] for t in config.data.tasks] if isinstance(adapters, dict) else adapters
        model = MoLoRAModel.from_lora_adapters(base, paths, config.molora, freeze_experts=config.model.freeze_experts)
    else:
        model = get_molora_model(base, config.molora)
    model.track_routing_stats = False  # only eval collects routing statistics
    if config.model.gradient_checkpointing:
        # on the wrapper: it also makes the inputs require grad, so experts behind the frozen
        # embeddings get gradients; non-reentrant checkpointing is the one torch recommends
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False  # no KV cache under checkpointing (transformers would warn and drop it)
    return model


def _prepare(
    accelerator, config: RunConfig, output_dir: Path, model: MoLoRAModel, train_ds, eval_sets: dict, collator
) -> _Run:
    """Optimizer, scheduler and loaders, prepared by accelerate for this process; the model is
    DDP-wrapped by accelerate, or sharded with FSDP2 before the optimizer is built (``train.fsdp``)."""
    t = config.train
    sharded = t.fsdp and accelerator.num_processes > 1
    if t.fsdp and not sharded:
        accelerator.print("train.fsdp: one process, nothing to shard; training unsharded")
    if sharded:
        model = shard_model(model, accelerator)
    optimizer, scheduler = build_optimizer(model, t)
    train_loader, eval_loaders = build_loaders(
        train_ds, eval_sets, collator, t, num_processes=accelerator.num_processes
    )
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would
    # step it once per process). A sharded model is not given to accelerate (it would wrap it in DDP).
    if sharded:
        optimizer, train_loader = accelerator.prepare(optimizer, train_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {n: accelerator.prepare_data_loader(dl) for n, dl in eval_loaders.items()}
    if len(train_loader) == 0:
        raise ValueError(
            f"the mixed training data has {len(train_ds)} examples, fewer than train.batch_size={t.batch_size} "
            f"x {accelerator.num_processes} processes: lower the batch size or add data"
        )
    inner = accelerator.unwrap_model(model)
    return _Run(config, accelerator, output_dir, model, inner, optimizer, scheduler, train_loader, eval_loaders)


def _restore(run: _Run, ckpt: Path | None) -> None:
    """Resume the optimizer, scheduler, RNG and data position from ``ckpt``; open the metrics log."""
    t = run.config.train
    run.max_grad_accum = t.grad_accum
    if ckpt is not None:
        state = load_training_state(run.accelerator, run.model, run.optimizer, run.scheduler, ckpt, train=t)
        run.step, run.micro = state["step"], state["micro_step"]
        run.max_grad_accum = max(state["max_grad_accum"], t.grad_accum)
    keep_until = run.step if ckpt is not None else None
    main = run.accelerator.is_main_process
    sinks = make_sinks(t.report_to, run.output_dir, main=main)
    run.log = MetricsLog(run.output_dir / METRICS, main, keep_until=keep_until, sinks=sinks)
    run.samples_log = MetricsLog(run.output_dir / SAMPLES, main, keep_until=keep_until)
    run.health = RoutingHealthMonitor(t.max_steps, router=run.config.molora.router, hint=TRAIN_HINT)
    if ckpt is not None:  # what the summary of a finished run reports (every rank: eval is collective)
        run.last_loss, run.last_eval = logged_so_far(run.output_dir / METRICS, run.step)
        run.eval_step = run.step if run.last_eval is not None else None


def _batches(run: _Run):
    """Training batches forever, from the current data position (epoch, batch within it)."""
    epoch, skip = divmod(run.micro, len(run.train_loader))
    while True:
        loader = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        loader.set_epoch(epoch)
        yield from loader
        epoch, skip = epoch + 1, 0


def _train_steps(run: _Run) -> None:
    """Optimizer steps up to ``train.max_steps``, logging, evaluating and checkpointing on schedule."""
    from tqdm.auto import tqdm

    t = run.config.train
    stream = _batches(run)
    bar = tqdm(
        total=t.max_steps,
        initial=run.step,
        disable=not (run.accelerator.is_main_process and t.progress_bar),
        desc="train",
        dynamic_ncols=True,
    )
    run.started = run.logged_at = time.time()
    run.start_step = run.step
    run.model.train()
    window, window_steps = torch.zeros(5, device=run.accelerator.device), 0  # see _optimizer_step, since the last log
    while run.step < t.max_steps:
        lrs = _optimizer_step(run, stream, window)
        run.step, window_steps = run.step + 1, window_steps + 1
        bar.update(1)
        if run.step % t.log_every == 0 or run.step == t.max_steps:
            _log_train(run, window, window_steps, lrs)
            window_steps = 0
            speed = _speed_text(run)
            if run.last_loss is not None:
                bar.set_postfix_str(f"loss {run.last_loss:.4f} | {speed}")
            if bar.disable:  # no bar to show it: print the loss at log_every instead
                loss = "n/a (no target in the window)" if run.last_loss is None else f"{run.last_loss:.4f}"
                run.accelerator.print(f"step {run.step}/{t.max_steps} | loss {loss} | {speed} | {lr_text(lrs)}")
        if t.eval_every and run.step % t.eval_every == 0 and run.step < t.max_steps:
            run.last_eval = _run_eval(run)
            run.logged_at = time.time()  # tokens/s counts training time only
        if t.save_every and (run.step % t.save_every == 0 or run.step == t.max_steps):  # the last step too: resumable
            check_weights_finite(run.accelerator, run.inner, t, run.step)
            save_checkpoint(
                run.accelerator,
                run.model,
                run.optimizer,
                run.scheduler,
                _trainer_state(run),
                run.output_dir,
                keep=t.save_total_limit,
            )
    bar.close()


def _eta(run: _Run) -> float | None:
    return eta_seconds(time.time() - run.started, run.step - run.start_step, run.config.train.max_steps - run.step)


def _speed_text(run: _Run) -> str:
    return speed_text(run.tokens_per_s, _eta(run))


def _optimizer_step(run: _Run, stream, window: torch.Tensor) -> dict[str, float]:
    """``grad_accum`` micro-batches, then one optimizer and scheduler step.

    The loss is weighted per optimizer step (:mod:`molora.training.objective`): a micro-batch
    without a supervised target contributes nothing. Adds this step's statistics to ``window``
    (5,): summed cross-entropy, targets, router loss, aux loss, input tokens (not padding). Returns the lr of each
    parameter group for this step.
    """
    t, accelerator, model = run.config.train, run.accelerator, run.model
    causal = run.config.model.task_type == "causal_lm"
    batches = [next(stream) for _ in range(t.grad_accum)]
    run.micro += t.grad_accum
    step_targets = torch.stack([count_targets(b["labels"], causal=causal) for b in batches]).sum()
    step_loss = torch.zeros((), device=accelerator.device)
    for k, batch in enumerate(batches):
        # gradients are all-reduced on the last micro-batch only
        sync = contextlib.nullcontext() if k == t.grad_accum - 1 else no_sync(accelerator, model)
        with sync:
            loss, stats = micro_batch_loss(
                model, run.inner, batch, causal=causal, step_targets=step_targets, grad_accum=t.grad_accum
            )
            accelerator.backward(loss)
        step_loss += loss.detach().float()
        window[:3] += stats.to(window.device, window.dtype)
        window[3] += run.inner.aux_loss().detach().float() / t.grad_accum
        window[4] += input_tokens(batch)
    # the norm is measured whether or not it clips (max_norm=inf scales by 1)
    norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
    check_step_finite(accelerator, t, run.step + 1, step_loss, norm)
    lrs = {f"lr_{g['name']}": g["lr"] for g in run.optimizer.param_groups}  # the lr of this step
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lrs


def _log_train(run: _Run, window: torch.Tensor, window_steps: int, lrs: dict[str, float]) -> None:
    """Log the loss (cross-entropy per supervised target plus the router losses) and aux loss
    since the last log, over steps and processes; reset ``window``.

    A window without a supervised target logs ``loss: null`` (never a NaN or a 0 on no token).
    """
    ce_sum, targets, router, aux, tokens = run.accelerator.reduce(window, reduction="sum").tolist()
    now = time.time()
    run.tokens_per_s, run.logged_at = tokens / max(now - run.logged_at, 1e-9), now
    processes = run.accelerator.num_processes
    window.zero_()
    loss = ce_sum / targets + router / (window_steps * processes) if targets > 0 else None
    run.last_loss = loss if loss is not None else run.last_loss
    epoch = run.micro / len(run.train_loader)
    run.log.write(
        {
            "type": "train",
            "step": run.step,
            "loss": loss,
            "targets": int(targets),
            "aux_loss": aux / (window_steps * processes),
            **lrs,
            "epoch": epoch,
            "tokens_per_s": run.tokens_per_s,
            "eta_s": _eta(run),
            "time": now - run.started,
        }
    )
    if run.accelerator.is_main_process:  # from the last micro-batch's routing: nothing extra in the forward
        run.log.write(health_record(run.inner, run.step, run.health))


def _run_eval(run: _Run) -> dict[str, Any] | None:
    """Evaluate every task with eval data, log and print it (None: no task has eval data)."""
    if not run.eval_loaders:
        return None
    result = evaluate(run.accelerator, run.model, run.eval_loaders, causal=run.config.model.task_type == "causal_lm")
    run.log.write({"type": "eval", "step": run.step, **result})
    run.eval_step = run.step
    summary = ", ".join(f"{n}: loss {r['loss']:.4f} acc {r['accuracy']:.3f}" for n, r in result["tasks"].items())
    run.accelerator.print(f"step {run.step} eval | {summary}")
    _log_samples(run)
    return result


def _log_samples(run: _Run) -> None:
    """``train.eval_samples`` greedy completions per task, on the main process (not under FSDP2)."""
    t = run.config.train
    if not t.eval_samples or run.config.model.task_type != "causal_lm" or is_sharded(run.model):
        return
    if run.accelerator.is_main_process:
        tasks = eval_samples(
            run.inner, run.eval_sets, run.tokenizer, k=t.eval_samples, max_new_tokens=t.eval_sample_tokens,
            device=run.accelerator.device,
        )
        record = {"type": "samples", "step": run.step, "tasks": tasks}
        run.samples_log.write(record)
        run.log.report(record)
    run.accelerator.wait_for_everyone()


def _trainer_state(run: _Run) -> dict[str, Any]:
    """What a checkpoint records of the loop (``trainer_state.json``)."""
    t = run.config.train
    return {
        "step": run.step,
        "micro_step": run.micro,
        "world_size": run.accelerator.num_processes,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "max_grad_accum": run.max_grad_accum,
        "seed": t.seed,
        "train": {key: getattr(t, key) for key in SCHEDULE_FIELDS},  # what a resume reports as changed
        "fsdp": is_sharded(run.model),  # the optimizer state is then one shard per rank
    }


def _summary(run: _Run, *, trainable: int, total: int) -> dict[str, Any]:
    """The run summary (``summary.json``)."""
    config = run.config
    return {
        "steps": run.step,
        "tasks": list(config.data.tasks),
        "final_train_loss": run.last_loss,
        "final_eval": None if run.last_eval is None else run.last_eval["tasks"],
        "trainable_params": trainable,
        "total_params": total,
        "router": config.molora.router,
        "num_experts": config.molora.num_experts,
        "num_processes": run.accelerator.num_processes,
        "fsdp": is_sharded(run.model),
        "mixed_precision": run.accelerator.mixed_precision,
        "wall_time_s": time.time() - run.started,
        "config": config.source,
    }


def _save_final(run: _Run, summary: dict[str, Any], eval_sets: dict, collator) -> None:
    """The final adapter, the per-task export and the summary (which records the export)."""
    accelerator, output_dir = run.accelerator, run.output_dir
    run.log.close()
    save_adapter(accelerator, run.model, output_dir / FINAL)
    if accelerator.is_main_process:
        summary["export"] = export_per_task(
            run.inner,
            run.config,
            eval_sets,
            collator,
            output_dir / EXPORT,
            accelerator.device,
            sharded=is_sharded(run.model),
        )
        atomic_write_text(output_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        accelerator.print(f"done: {run.step} steps; adapter in {output_dir / FINAL}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
