"""The export at the end of a training run: per-task merged PEFT adapters in
``output_dir/export``, from the task router's tables, or from gates measured on each task's
eval data (other routers)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from molora.merge.export import measure_gates
from molora.model import MoLoRAModel
from molora.training.run_config import RunConfig
from molora.training.run_dir import FINAL

__all__ = ["export_per_task"]


def export_per_task(
    model: MoLoRAModel, config: RunConfig, eval_sets: dict, collator, path: Path, device, *, sharded: bool = False
) -> str | None:
    """Per-task merged PEFT adapters: the task router's tables, or gates measured per task.

    Args:
        model: the unwrapped, trained MoLoRA model.
        config: the run config (``train.export``, the router, eval batch size).
        eval_sets: ``{task: eval Dataset with task_ids}``, to measure gates on.
        collator: pads eval examples into batches.
        path: the export folder.
        device: where the eval batches go.
        sharded: the run is under FSDP (export is skipped: the adapter is exported later
            with ``molora export``).

    Returns:
        The export folder, or None when skipped (the reason is printed).
    """
    if not config.train.export:
        return None
    if sharded:
        print(f"export skipped under FSDP: export the adapter in {path.parent / FINAL} with `molora export`")
        return None
    if config.molora.router == "task":
        return _report(model.export_merged_adapter(path, task="all"), path)
    if not eval_sets:
        print("export skipped: per-task gates are measured on eval data and no task has an eval file")
        return None

    def batches():
        for ds in eval_sets.values():
            for batch in DataLoader(
                ds, batch_size=config.train.eval_batch_size or config.train.batch_size, collate_fn=collator
            ):
                batch.pop("labels", None)
                yield {k: v.to(device) for k, v in batch.items()}

    model.track_routing_stats = False
    gates = measure_gates(model, batches(), by_task=True)
    return _report(model.export_merged_adapter(path, weights=gates, task="all"), path)


def _report(reports: dict, path: Path) -> str:
    """Print how to merge the export into weights where the base is quantized; returns ``path``."""
    note = next((rep["quantized_base"]["merge"] for rep in reports.values() if rep.get("quantized_base")), None)
    if note:
        print(f"export in {path}; note: {note.replace('RUN', str(path.parent))}")
    return str(path)
