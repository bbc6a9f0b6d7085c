"""The demo's export check: the task-router model as one exact PEFT LoRA adapter per task.

``export_merged_adapter(task="all", method="cat")`` writes the adapters; each is loaded with
``peft.PeftModel.from_pretrained`` on a freshly loaded MiniLM, with the task heads read back
from the run folder (what a user would deploy), and must score exactly the routed model's
accuracy on its task.
"""

from __future__ import annotations

import copy
from pathlib import Path

from molora.apps.demo.config import DemoConfig
from molora.apps.demo.data import TaskData
from molora.apps.demo.models import MultitaskClassifier, load_heads
from molora.apps.demo.train import TrainedModel, accuracy, predict

__all__ = ["export_check"]


def export_check(trained: TrainedModel, tasks: list[TaskData], collator, cfg: DemoConfig, out: Path) -> dict:
    """Export one exact PEFT adapter per task into ``out/adapters`` and score each.

    Args:
        trained: the trained ``molora-task`` model (its heads saved in ``out/molora-task``).
        tasks: the tasks' rows.
        collator: turns rows into a padded batch.
        cfg: ``eval_batch_size``.
        out: the run folder.

    Returns:
        ``{task: {"routed_accuracy", "exported_accuracy", "max_abs_logit_diff", "ok"}}``.
    """
    from peft import PeftModel
    from transformers import AutoModel

    from molora.apps.demo.tasks import minilm_model_path

    adapters = out / "adapters"
    trained.model.encoder.export_merged_adapter(adapters, task="all", method="cat")
    fresh = AutoModel.from_pretrained(minilm_model_path())  # independent of the trained model
    heads = load_heads(out / "molora-task" / "heads.safetensors", tasks, fresh.config.hidden_size)
    routed_acc = trained.row["accuracy"]
    check = {}
    for t, task in enumerate(tasks):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), adapters / task.name)
        plain = MultitaskClassifier(peft_model, heads, pass_task_ids=False)
        logits = predict(plain, t, task.test, collator, cfg.eval_batch_size)  # (n, C)
        acc = accuracy(logits, task.test)
        check[task.name] = {
            "routed_accuracy": routed_acc[task.name],
            "exported_accuracy": acc,
            "max_abs_logit_diff": (logits - trained.logits[task.name]).abs().max().item(),
            "ok": acc == routed_acc[task.name],
        }
    return check
