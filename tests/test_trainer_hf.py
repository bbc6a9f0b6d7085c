"""MoLoRAModel as the `model` of transformers.Trainer, with `task_ids` in the dataset."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import LLAMA_TARGETS
from datasets import Dataset
from tiny_models import tiny_llama

from molora import MoLoRAConfig, get_molora_model
from molora.training.data import MultitaskCollator


def _task_dataset(n: int = 64, length: int = 12) -> Dataset:
    """Two synthetic tasks: task 0 counts up (x, x+1, ...), task 1 repeats a token."""
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "labels": [], "task_ids": []}
    for i in range(n):
        task = i % 2
        start = int(torch.randint(3, 8, (1,), generator=g)) + 50 * task
        ids = [start + j for j in range(length)] if task == 0 else [start] * length
        rows["input_ids"].append(ids)
        rows["labels"].append(ids)
        rows["task_ids"].append(task)
    return Dataset.from_dict(rows)


def test_forward_signature_keeps_task_ids_and_base_args():
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="task", num_tasks=2))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "task_ids"} <= set(params)


def test_hf_trainer_trains_molora_with_task_ids(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = MoLoRAConfig(target_modules=LLAMA_TARGETS, num_experts=4, r=4, lora_alpha=8, router="task", num_tasks=2, top_k=2, router_aux_loss_coef=0.01, expert_impl="dense")
    # A larger init than HF's 0.02 gives the frozen random lm_head logits that adapters can steer.
    model = get_molora_model(tiny_llama(initializer_range=0.2), config)
    first_router = next(iter(model.molora_layers().values())).router
    initial_gap = torch.softmax(first_router.table.detach(), -1).diff(dim=0).abs().sum()
    seen_task_ids = []
    original = model.forward

    def spy(*args, **kwargs):
        seen_task_ids.append(kwargs.get("task_ids"))
        return original(*args, **kwargs)

    spy.__signature__ = inspect.signature(original)
    model.forward = spy
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=25,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_task_dataset(), data_collator=MultitaskCollator(pad_token_id=0))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) >= 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    # Trainer kept the task_ids column and passed it on (the task router requires it)
    assert seen_task_ids and all(t is not None and t.shape == (8,) for t in seen_task_ids)
    assert any(float(layer.lora_B.detach().abs().sum()) > 0 for layer in model.molora_layers().values())
    # the task router learned different mixtures for the two tasks: the gap between the two
    # tasks' gates grew from its (random, small) value at initialization
    router = next(iter(model.molora_layers().values())).router
    gap = torch.softmax(router.table.detach(), -1).diff(dim=0).abs().sum()
    assert gap > 2 * initial_gap + 1e-3, (float(initial_gap), float(gap))


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_trainer_loss_includes_aux_loss(router):
    config = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router=router, router_aux_loss_coef=0.5)
    model = get_molora_model(tiny_llama(), config)
    batch = MultitaskCollator(pad_token_id=0)([_task_dataset(2)[i] for i in range(2)])
    out = model(**batch)
    with model.disable_adapters():
        plain = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    # B = 0 at init: the base loss is unchanged, so the difference is the weighted aux loss
    assert out.loss.item() == pytest.approx(plain.item() + 0.5 * model.aux_loss().item(), rel=1e-5)


def _trainer(model, tmp_path, **overrides):
    from transformers import Trainer, TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=1,
        learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    args = TrainingArguments(**{**kwargs, **overrides})
    return Trainer(model=model, args=args, data_collator=MultitaskCollator(pad_token_id=0))


def test_trainer_reports_eval_loss_and_labels_without_label_names(tmp_path):
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="task", num_tasks=2))
    trainer = _trainer(model, tmp_path)
    metrics = trainer.evaluate(_task_dataset(6))
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    prediction = trainer.predict(_task_dataset(4))
    assert prediction.label_ids is not None and prediction.label_ids.shape[0] == 4


def _router_grads_of_first_step(tmp_path, accumulation: int, batch: int) -> list[torch.Tensor]:
    """Router gradients at the first optimizer step of a Trainer run whose rows are all equal."""
    from transformers import TrainerCallback

    config = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, r=2, router="topk", router_aux_loss_coef=1.0)
    model = get_molora_model(tiny_llama(seed=3), config)
    row = _task_dataset(1)[0]
    rows = Dataset.from_dict({key: [row[key]] * 8 for key in row})
    grads = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not grads:
                for layer in model.molora_layers().values():
                    grads.append(layer.router.weight.grad.detach().clone())

    trainer = _trainer(model, tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    trainer.train_dataset = rows
    trainer.add_callback(Capture())
    trainer.train()
    return grads


def test_router_losses_keep_their_weight_per_optimizer_step_under_accumulation(tmp_path):
    """Identical micro-batches: 4 of 2 rows accumulated must give the gradient of 1 batch of 8 rows;
    the aux loss used to count once per micro-batch (4x its weight)."""
    one = _router_grads_of_first_step(tmp_path / "a", accumulation=1, batch=8)
    four = _router_grads_of_first_step(tmp_path / "b", accumulation=4, batch=2)
    for g1, g4 in zip(one, four):
        torch.testing.assert_close(g4, g1, rtol=1e-4, atol=1e-7)


def test_readme_trainer_block_runs_with_router_lr_and_health_callback(tmp_path, monkeypatch):
    """The README's `Trainer(optimizers=...)` block, as written: the router gets 20x lr (task
    router default), LoRA+ 4x on B, and the callback adds routing health to the logs."""
    import re

    from conftest import REPO_ROOT

    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "RoutingHealthCallback" in b and "create_molora_optimizer" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    optimizer, trainer = scope["optimizer"], scope["trainer"]
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"base": 2e-3, "lora_B": 8e-3, "router": 4e-2})
    logged = [log for log in trainer.state.log_history if "routing/entropy" in log]
    assert [log["step"] for log in logged] == [4, 8] and all(0 < log["routing/entropy"] <= 1 for log in logged)
