"""TRL's SFTTrainer on a MoLoRAModel: TRL's fused LM head runs inside molora's forward (task ids
route, the backbone is the base model's), and MoLoRASFTTrainer adds the router losses."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_llama

from molora import MoLoRAConfig, get_molora_model
from molora.training.data import MultitaskCollator
from molora.training.tokenizer import build_byte_tokenizer

trl = pytest.importorskip("trl")

FIRST_TOKEN = {0: 5, 1: 50}  # each task's rows start with their own token


def _rows(n: int = 8) -> Dataset:
    ids = [[FIRST_TOKEN[i % 2], *range(10 + i, 17 + i), 2] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "task_ids": [i % 2 for i in range(n)]})


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )
    return trl.SFTConfig(**{**kwargs, **overrides})


def test_plain_sft_trainer_trains_a_molora_model(tmp_path):
    # before the fix: AttributeError 'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router="topk", top_k=1, router_aux_loss_coef=0.01))
    trainer = trl.SFTTrainer(model=model, args=_args(tmp_path), train_dataset=_rows().remove_columns("task_ids"), processing_class=build_byte_tokenizer())
    with pytest.warns(UserWarning, match="does not read out.loss"):  # the router losses need MoLoRASFTTrainer
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(float(layer.lora_B.detach().abs().sum()) > 0 for layer in model.molora_layers().values())


def _sft_run(tmp_path, coef: float):
    from molora import get_optimizer_param_groups
    from molora.training.sft import MoLoRASFTTrainer

    config = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router="task", num_tasks=2, router_aux_loss_coef=coef)
    model = get_molora_model(tiny_llama(), config)
    groups = get_optimizer_param_groups(model, lr=1e-2, router_lr=1e-1)
    optimizer = torch.optim.AdamW(groups)
    seen = {}
    layer = next(iter(model.molora_layers().values()))
    model.base_model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.__setitem__("input_ids", a[0]))
    layer.router.register_forward_pre_hook(lambda m, a: seen.__setitem__("task_ids", a[1]))
    trainer = MoLoRASFTTrainer(
        model=model, args=_args(tmp_path, max_steps=1), train_dataset=_rows(), processing_class=build_byte_tokenizer(),
        optimizers=(optimizer, None),
    )
    table = layer.router.table.detach().clone()
    trainer.train()
    log = trainer.state.log_history[0]
    return model, log, seen, table, layer


def test_molora_sft_trainer_adds_router_losses_and_routes_by_task(tmp_path):
    _, plain, _, _, _ = _sft_run(tmp_path / "a", coef=0.0)
    model, log, seen, table, layer = _sft_run(tmp_path / "b", coef=0.5)
    # B = 0 at the first step: the cross-entropy is the same, the difference is 0.5 * aux
    assert log["router_loss"] == pytest.approx(0.5 * float(model.aux_loss()), rel=1e-4)
    assert log["router_loss"] > 0.1
    assert log["loss"] - plain["loss"] == pytest.approx(log["router_loss"], rel=1e-3)
    # the task_ids column reached the layers: every token of a row routes with its row's task
    ids = seen["input_ids"]  # (B, L)
    task_per_token = seen["task_ids"].view(ids.shape)  # (B, L)
    for row, tasks in zip(ids, task_per_token):
        expected = 0 if int(row[0]) == FIRST_TOKEN[0] else 1
        assert set(tasks.tolist()) == {expected}
    # the router group ran at its own lr: the task table moved
    assert not torch.equal(layer.router.table.detach(), table)
