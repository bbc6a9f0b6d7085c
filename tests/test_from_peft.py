"""Tests for molora.merge.from_peft: MoLoRA experts initialised from existing PEFT LoRA adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from molora import MoLoRAConfig, MoLoRALinear, MoLoRAModel, get_molora_model
from molora.merge.from_peft import read_lora_adapter

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

VOCAB = 128
TARGETS = ["q_proj", "v_proj"]


def _llama(hidden=32):
    return tiny_llama(hidden_size=hidden).train()


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _peft_adapter(base, path, seed, **lora_kw):
    """Save a PEFT LoRA adapter with random (non-zero) A and B; returns the path."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, init_lora_weights=False, **lora_kw))
    model.save_pretrained(str(path))
    return path


def _one_hot_task_config(n, r):
    # top-1 with renormalization: each task's gate is exactly 1 (the k=1 default is the raw probability)
    return MoLoRAConfig(
        target_modules=TARGETS, num_experts=n, r=r, lora_alpha=16, router="task", num_tasks=n, top_k=1,
        normalize_top_k=True,
    )


def _route_task_i_to_expert_i(model):
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.router.table.copy_(10.0 * torch.eye(layer.num_experts))  # top-1: exactly one-hot


def test_peft_adapters_with_different_ranks_and_scalings(tmp_path):
    base = _llama()
    paths = [
        _peft_adapter(base, tmp_path / "a0", 0, r=2, lora_alpha=4),
        _peft_adapter(base, tmp_path / "a1", 1, r=4, lora_alpha=3, use_rslora=True),
        _peft_adapter(
            base, tmp_path / "a2", 2, r=2, lora_alpha=8, rank_pattern={"v_proj": 3}, alpha_pattern={"v_proj": 5}
        ),
    ]
    ids = _ids()
    expected = [_logits(PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval(), ids) for p in paths]
    model = MoLoRAModel.from_lora_adapters(copy.deepcopy(base), paths, _one_hot_task_config(3, 4))
    _route_task_i_to_expert_i(model)
    model.eval()
    for i in range(3):
        got = _logits(model, ids, task_ids=torch.tensor([i, i]))
        torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-4)
    layer = next(iter(model.molora_layers().values()))
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad  # only the router trains
    assert all(p.requires_grad for p in layer.router.parameters())
    assert not layer.lora_B[0, :, 2:].any()  # rank-2 adapter padded to r=4 with zero columns


def test_round_trip_export_single_experts_then_rebuild(tmp_path):
    base = _llama()
    fresh = copy.deepcopy(base)
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=3, r=2, lora_alpha=8, router="soft", use_rslora=True)
    model = get_molora_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(7)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"e{i}")
        model.export_merged_adapter(paths[-1], weights=torch.nn.functional.one_hot(torch.tensor(i), 3).float())
    ids = _ids()
    expected = [_logits(PeftModel.from_pretrained(copy.deepcopy(fresh), str(p)).eval(), ids) for p in paths]
    rebuilt = MoLoRAModel.from_lora_adapters(copy.deepcopy(fresh), paths, _one_hot_task_config(3, 2), freeze_experts=False)
    _route_task_i_to_expert_i(rebuilt)
    rebuilt.eval()
    for i in range(3):
        got = _logits(rebuilt, ids, task_ids=torch.tensor([i, i]))
        torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-4)
    # with the original scaling folded back, expert i equals the trained expert i exactly
    for name, layer in rebuilt.molora_layers().items():
        orig = model.molora_layers()[name]
        for i in range(3):
            torch.testing.assert_close(
                layer.scaling * layer.lora_B[i] @ layer.lora_A[i], orig.scaling * orig.lora_B[i] @ orig.lora_A[i],
                atol=1e-6, rtol=1e-5,
            )
    assert rebuilt.molora_layers()[name].lora_A.requires_grad


def test_errors_for_mismatched_adapters(tmp_path):
    base = _llama()
    a = _peft_adapter(base, tmp_path / "a", 0, r=2)
    b = _peft_adapter(base, tmp_path / "b", 1, r=4)
    cfg = _one_hot_task_config(2, 4)
    with pytest.raises(ValueError, match="`num_experts` must equal the number of adapters"):
        MoLoRAModel.from_lora_adapters(copy.deepcopy(base), [a], cfg)
    with pytest.raises(ValueError, match="`r` must be >= the largest adapter rank 4"):
        MoLoRAModel.from_lora_adapters(copy.deepcopy(base), [a, b], _one_hot_task_config(2, 2))
    # other target modules
    torch.manual_seed(3)
    other = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["k_proj"], r=2, init_lora_weights=False))
    other.save_pretrained(str(tmp_path / "k"))
    with pytest.raises(ValueError, match="target different modules"):
        MoLoRAModel.from_lora_adapters(copy.deepcopy(base), [a, tmp_path / "k"], cfg)
    victim = copy.deepcopy(base)
    cfg_k = MoLoRAConfig(target_modules=["k_proj"], num_experts=2, r=4, router="soft")
    with pytest.raises(ValueError, match="selects other modules than the adapters target"):
        MoLoRAModel.from_lora_adapters(victim, [a, b], cfg_k)
    assert not any(isinstance(m, MoLoRALinear) for m in victim.modules())  # base restored
    # adapter of another base model: shapes, and the recorded name
    wide = _peft_adapter(_llama(hidden=64), tmp_path / "wide", 4, r=2)
    with pytest.raises(ValueError, match="another base model"):
        MoLoRAModel.from_lora_adapters(copy.deepcopy(base), [a, wide], cfg)
    named = base.__class__(base.config)
    named.config._name_or_path = "org/base-7b"
    config_file = tmp_path / "b" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "base_model_name_or_path": "org/other-7b"}))
    with pytest.raises(ValueError, match="trained on base model 'org/other-7b'"):
        MoLoRAModel.from_lora_adapters(named, [a, tmp_path / "b"], cfg)
    # unsupported adapter kinds
    torch.manual_seed(5)
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="`use_dora` must be false"):
        read_lora_adapter(tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        read_lora_adapter(tmp_path)


def test_gpt2_conv1d_adapters(tmp_path):
    base = tiny_gpt2().train()
    paths = []
    for i, r in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        lora = LoraConfig(target_modules=["c_attn"], r=r, lora_alpha=4, fan_in_fan_out=True, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), lora).save_pretrained(str(tmp_path / f"g{i}"))
        paths.append(tmp_path / f"g{i}")
    ids = _ids()
    expected = [_logits(PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval(), ids) for p in paths]
    cfg = MoLoRAConfig(target_modules=["c_attn"], num_experts=2, r=3, router="task", num_tasks=2, top_k=1, normalize_top_k=True)
    model = MoLoRAModel.from_lora_adapters(copy.deepcopy(base), paths, cfg)
    _route_task_i_to_expert_i(model)
    model.eval()
    for i in range(2):
        got = _logits(model, ids, task_ids=torch.tensor([i, i]))
        torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-4)


def test_task_router_from_one_adapter_per_task_starts_as_that_adapter(tmp_path):
    """Issue 16: with the default task router (softmax over all experts, no top_k), task i is
    adapter i at step 0: equal to PeftModel with that adapter within 1e-4, with no manual table edit."""
    base = _llama()
    paths = [_peft_adapter(base, tmp_path / f"a{i}", 10 + i, r=4, lora_alpha=8) for i in range(3)]
    ids = _ids()
    expected = [_logits(PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval(), ids) for p in paths]
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=3, r=4, lora_alpha=8, router="task", num_tasks=3)
    model = MoLoRAModel.from_lora_adapters(copy.deepcopy(base), paths, cfg).eval()
    for i in range(3):
        got = _logits(model, ids, task_ids=torch.tensor([i, i]))
        assert (got - expected[i]).abs().max() < 1e-4, i
        others = [_logits(PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval(), ids) for p in paths if p != paths[i]]
        assert all((got - o).abs().max() > 1e-2 for o in others)  # the adapters differ: the check can fail
    layer = next(iter(model.molora_layers().values()))
    gates = torch.softmax(layer.router.table, -1)  # (tasks, N)
    torch.testing.assert_close(gates.diagonal(), torch.full((3,), 1 - 1e-6), atol=1e-7, rtol=0)
    assert not layer.lora_A.requires_grad and layer.router.table.requires_grad  # frozen experts by default
    unfrozen = MoLoRAModel.from_lora_adapters(copy.deepcopy(base), paths, cfg, freeze_experts=False, identity_gate=0.9)
    layer = next(iter(unfrozen.molora_layers().values()))
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    torch.testing.assert_close(torch.softmax(layer.router.table, -1).diagonal(), torch.full((3,), 0.9))
    with pytest.raises(ValueError, match=r"`identity_gate` must be None or in \(1/num_experts, 1\)"):
        MoLoRAModel.from_lora_adapters(copy.deepcopy(base), paths, cfg, identity_gate=1.0)


def test_molora_train_starts_from_one_adapter_per_task(tmp_path):
    """`model.from_adapters: {task: folder}` in a run config: a second run built from the first
    run's per-task exports evaluates as the first run did (task i is adapter i), and only its
    router trains (`model.freeze_experts` defaults to true)."""
    from conftest import TINY_CONFIG, tiny_run_overrides

    from molora.cli import main

    common = {"molora.router": "task", "molora.top_k": "null", "molora.num_experts": 2, "train.max_steps": 1}
    common |= {"train.eval_every": 0, "train.save_every": 0, "train.max_eval_batches": 1}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "first", common)]) == 0
    first = tmp_path / "first"
    second = {**common, "model.from_config": "null", "model.name_or_path": str(first / "base_model")}
    second |= {f"model.from_adapters.{t}": str(first / "export" / t) for t in ("reverse", "sort")}
    second |= {"molora.r": 8, "train.export": "false"}  # the exports are rank 2 x 4 ("cat" of 2 experts)
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "second", second)]) == 0

    def records(run, kind):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["type"] == kind]

    before, after = records("first", "eval")[-1]["tasks"], records("second", "eval")[-1]["tasks"]
    for task in ("reverse", "sort"):
        assert after[task]["loss"] == pytest.approx(before[task]["loss"], rel=1e-4), task
    assert [k for k in records("second", "train")[-1] if k.startswith("lr_")] == ["lr_router"]  # frozen experts
