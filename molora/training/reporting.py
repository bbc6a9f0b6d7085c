"""Where a run's records go besides ``metrics.jsonl``: TensorBoard (``train.report_to``), and the
throughput and ETA figures logged beside the loss.

:class:`TensorBoardSink` receives every record that :class:`~molora.training.metrics.MetricsLog`
writes, so any scalar a record holds (loss, lr, tokens/s, eval loss and accuracy per task, and
whatever routing-health figures the loop adds) reaches TensorBoard under its flattened key
(``train/loss``, ``eval/tasks/<task>/loss``, ...); per-layer expert loads (lists) stay in
``metrics.jsonl``. Eval samples are written as text (``samples/<task>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "TENSORBOARD_DIR",
    "TensorBoardSink",
    "eta_seconds",
    "flatten_scalars",
    "format_eta",
    "input_tokens",
    "lr_text",
    "make_sinks",
    "speed_text",
]

TENSORBOARD_DIR = "tensorboard"
_SKIP = ("type", "step", "time")  # the record's kind and x axis, not series


def flatten_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"a/b/c": number}`` for every int/float (not bool) in a nested record; lists are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in _SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def format_eta(seconds: float | None) -> str:
    """``1:02:03`` (h:mm:ss), or ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TensorBoardSink:
    """Writes records as TensorBoard scalars and text, with ``torch.utils.tensorboard``.

    Args:
        log_dir: the event-file folder (``RUN/tensorboard``).
    """

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this when the tensorboard package is missing
            raise ImportError(
                "train.report_to: [tensorboard] needs the tensorboard package: pip install 'molora[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        """Every scalar of ``record`` at its ``step``, under ``<type>/<flattened key>``;
        a ``samples`` record as one text entry per task."""
        step, kind = int(record.get("step", 0)), record.get("type", "record")
        if kind == "samples":
            for task, rows in record.get("tasks", {}).items():
                self.writer.add_text(f"samples/{task}", _samples_markdown(rows), step)
        else:
            body = {k: v for k, v in record.items() if k != "routing"}  # per-layer load lists: jsonl only
            for key, value in flatten_scalars(body).items():
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _samples_markdown(rows: list[dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "⏎")

    lines = ["| prompt | completion | reference |", "|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['completion'])} | {cell(r['reference'])} |" for r in rows]
    return "\n".join(lines)


def make_sinks(report_to: list[str], output_dir: Path, *, main: bool) -> list[Any]:
    """The sinks named by ``train.report_to`` (main process only; others get none)."""
    if not main:
        return []
    return [TensorBoardSink(output_dir / TENSORBOARD_DIR) for target in report_to if target == "tensorboard"]


def lr_text(lrs: dict[str, float]) -> str:
    """``base 1.00e-03 router 2.00e-02``: the learning rates of a train line."""
    return " ".join(f"{name} {lr:.2e}" for name, lr in lrs.items())


def eta_seconds(elapsed: float, done: int, left: int) -> float | None:
    """Seconds left at the mean step time so far (evals included); None before the first step."""
    if done <= 0:
        return None
    return elapsed / done * left


def speed_text(tokens_per_s: float | None, eta: float | None) -> str:
    """``1,234 tok/s | ETA 3m05s`` for the train line."""
    speed = "? tok/s" if tokens_per_s is None else f"{tokens_per_s:,.0f} tok/s"
    return f"{speed} | ETA {format_eta(eta)}"


def input_tokens(batch: dict) -> Any:
    """Tokens the model read: without padding, or every position of a packed batch (which has no mask)."""
    import torch

    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())
