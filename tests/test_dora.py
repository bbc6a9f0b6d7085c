"""DoRA experts on the task router: every expert path against an eager reference written here
(outputs and gradients), bf16 autocast, gradient checkpointing, save/load, the PEFT DoRA export,
merge_and_unload, and the refusals (token routers, vLLM)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import interpreted_triton_kernels, needs_triton_interpreter
from tiny_models import tiny_gpt2, tiny_llama, trained
from torch import nn

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core.layer import MoLoRALinear
from routers import build_router

NUM_TASKS, N, R = 3, 4, 2


def reference_dora(layer: MoLoRALinear, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Eager DoRA: W_t = W0 + s * sum_i g_{t,i} B_i A_i materialized per sequence, then
    y = m * (W_t x) / ||W_t||_row (norm detached) + b. x: (batch, L, in); task_ids: (batch,)."""
    probs = torch.softmax(layer.router.table.float(), dim=-1)  # (tasks, N)
    k = layer.router.top_k
    if k is not None:
        top, idx = probs.topk(k, dim=-1)
        top = top / top.sum(-1, keepdim=True) if k >= 2 else top
        probs = torch.zeros_like(probs).scatter(-1, idx, top)
    W0 = layer.base_layer.weight.float()
    W0 = W0.T if layer.fan_in_fan_out else W0  # (out, in)
    A = layer.lora_A.expand(layer.num_experts, -1, -1)
    outs = []
    for b in range(x.shape[0]):
        g = probs[task_ids[b]]
        W = W0 + layer.scaling * sum(g[i] * layer.lora_B[i] @ A[i] for i in range(layer.num_experts))
        if layer.num_shared_experts:
            W = W + layer.scaling * sum(
                layer.lora_B_shared[j] @ layer.lora_A_shared[j] for j in range(layer.num_shared_experts)
            )
        norm = torch.linalg.norm(W, dim=1).detach()  # (out,)
        y = (x[b] @ W.T) * (layer.lora_magnitude / norm)
        bias = layer.base_layer.bias
        outs.append(y if bias is None else y + bias)
    return torch.stack(outs)


def make_layer(impl: str, top_k: int | None, *, share_lora_A=False, shared=0, seed=0) -> MoLoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 20, bias=True)
    router = build_router("task", 24, num_experts=N, num_tasks=NUM_TASKS, top_k=top_k, init_std=1.0)
    layer = MoLoRALinear(
        base, num_experts=N, r=R, lora_alpha=4, router=router, expert_impl=impl, use_dora=True,
        share_lora_A=share_lora_A, num_shared_experts=shared,
    )  # fmt: skip
    with torch.no_grad():  # B = 0 would hide every expert term; m != ||W0|| tests the magnitude
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 20))
        if shared:
            layer.lora_B_shared.normal_(0, 0.3)
    return layer


def check_against_reference(layer: MoLoRALinear, dtype=torch.float32, atol=1e-5) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 24, requires_grad=True)
    task_ids = torch.tensor([2, 0, 2])
    layer.routing_context.task_ids = task_ids
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.router.table]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x)
    ref = reference_dora(layer, x, task_ids)
    grad_y = torch.randn_like(ref)
    grads = torch.autograd.grad(y.float(), params, grad_y)
    ref_grads = torch.autograd.grad(ref, params, grad_y)
    assert y.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    scale = ref.abs().max()
    assert (y.float() - ref).abs().max() <= atol * scale, (y.float() - ref).abs().max()
    for name, g, r in zip(["x", "lora_A", "lora_B", "magnitude", "table"], grads, ref_grads):
        assert (g.float() - r).abs().max() <= atol * max(r.abs().max(), 1e-3), name


@pytest.mark.parametrize("impl", ["eager", "dense", "grouped", "grouped_bmm", "hybrid", "auto"])
@pytest.mark.parametrize("top_k", [None, 2, 1])
def test_dora_matches_eager_reference_on_every_path(impl, top_k):
    check_against_reference(make_layer(impl, top_k))


@needs_triton_interpreter
@pytest.mark.parametrize("top_k", [None, 2])
def test_dora_triton_path_matches_reference(top_k):
    interpreted_triton_kernels()
    check_against_reference(make_layer("triton", top_k))


@pytest.mark.parametrize("form", [dict(share_lora_A=True), dict(shared=1)])
def test_dora_with_expert_structures_matches_reference(form):
    """The norm includes a shared A (expanded) and the always-on shared experts."""
    check_against_reference(make_layer("dense", 2, **form))


@pytest.mark.parametrize("impl", ["dense", "grouped", "hybrid"])
def test_dora_under_bf16_autocast(impl):
    check_against_reference(make_layer(impl, 2), dtype=torch.bfloat16, atol=3e-2)


def test_dora_norm_is_not_materialized_per_task_but_equals_it():
    """dora_norms (factored) equals the row norm of W0 + dW_t formed densely, for every task."""
    from molora.core.dora import dora_norms
    from molora.merge.factors import dense_delta

    layer = make_layer("dense", 2, shared=1)
    gates = layer.router.table_weights().detach()
    norms = dora_norms(layer, gates)
    for t in range(NUM_TASKS):
        shared = (layer.lora_A_shared.detach(), layer.lora_B_shared.detach())
        W = layer.base_layer.weight + dense_delta(
            layer.lora_A.detach(), layer.lora_B.detach(), gates[t], layer.scaling, shared
        )
        torch.testing.assert_close(norms[t], torch.linalg.norm(W, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["soft", "topk", "topp"])
def test_token_router_with_dora_is_refused(router):
    extra = {"top_p": 0.5} if router == "topp" else {}
    with pytest.raises(ValueError, match=r"use_dora=True.*router='task'.*per token|per token.*router='task'"):
        MoLoRAConfig(router=router, use_dora=True, **extra)


def test_token_router_layer_with_dora_is_refused():
    router = build_router("soft", 8, num_experts=2)
    with pytest.raises(ValueError, match="task router"):
        MoLoRALinear(nn.Linear(8, 8), num_experts=2, r=2, lora_alpha=4, router=router, use_dora=True)


def dora_config(**kw) -> MoLoRAConfig:
    base = dict(
        target_modules=["q_proj", "v_proj", "down_proj"], num_experts=N, r=R, lora_alpha=4,
        router="task", num_tasks=NUM_TASKS, top_k=2, use_dora=True, router_init_std=1.0,
    )  # fmt: skip
    return MoLoRAConfig(**{**base, **kw})


def test_dora_model_starts_at_base_and_trains_magnitude():
    ids = torch.randint(0, 128, (3, 9))
    task_ids = torch.tensor([0, 1, 2])
    base_logits = tiny_llama()(input_ids=ids).logits
    model = get_molora_model(tiny_llama(), dora_config())
    torch.testing.assert_close(model(input_ids=ids, task_ids=task_ids).logits, base_logits, rtol=1e-5, atol=1e-5)
    layer = next(iter(model.molora_layers().values()))
    m0 = layer.lora_magnitude.detach().clone()
    torch.testing.assert_close(m0, torch.linalg.norm(layer.base_layer.weight, dim=1))
    trained(model, ids, task_ids)
    assert not torch.equal(layer.lora_magnitude.detach(), m0)


def test_dora_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 128, (3, 9))
    task_ids = torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        model = get_molora_model(tiny_llama(), dora_config())
        with torch.no_grad():
            for layer in model.molora_layers().values():
                layer.lora_B.normal_(0, 0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids, task_ids=task_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_magnitude" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_dora_save_load_round_trip(tmp_path):
    ids = torch.randint(0, 128, (3, 9))
    task_ids = torch.tensor([2, 1, 0])
    model = trained(get_molora_model(tiny_llama(), dora_config()), ids, task_ids)
    expected = model(input_ids=ids, task_ids=task_ids).logits
    model.save_pretrained(tmp_path / "a")
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(loaded(input_ids=ids, task_ids=task_ids).logits, expected)


def peft_logits(base: nn.Module, path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    assert peft_model.peft_config["default"].use_dora
    return peft_model(input_ids=ids).logits


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_dora_per_task_export_loads_in_peft_and_matches(tmp_path, make_base):
    pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"] if make_base is tiny_llama else ["c_attn", "c_fc"]
    ids = torch.randint(0, 128, (2, 9))
    model = trained(get_molora_model(make_base(), dora_config(target_modules=targets)), ids, torch.tensor([0, 2]))
    report = model.export_merged_adapter(tmp_path / "tasks", task="all")
    assert set(report) == {f"task_{t}" for t in range(NUM_TASKS)}
    for t in range(NUM_TASKS):
        routed = model(input_ids=ids, task_ids=torch.tensor([t, t])).logits
        exported = peft_logits(make_base(), tmp_path / "tasks" / f"task_{t}", ids)
        torch.testing.assert_close(exported, routed, rtol=1e-4, atol=1e-4)
    fidelity = model.export_merged_adapter(
        tmp_path / "t1", task=1, eval_batches=[{"input_ids": ids, "task_ids": torch.tensor([1, 1])}]
    )["fidelity"]
    assert fidelity["max_abs_logit_diff"] < 1e-4


def test_dora_merge_and_unload_folds_the_magnitude():
    ids = torch.randint(0, 128, (2, 9))
    model = trained(get_molora_model(tiny_llama(), dora_config()), ids, torch.tensor([0, 1]))
    routed = model(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
    merged = model.merge_and_unload(task=1)
    torch.testing.assert_close(merged(input_ids=ids).logits, routed, rtol=1e-4, atol=1e-4)


def test_vllm_target_refuses_dora(tmp_path):
    model = get_molora_model(tiny_llama(), dora_config())
    with pytest.raises(ValueError, match="vLLM does not serve DoRA"):
        model.export_merged_adapter(tmp_path / "v", task=0, target="vllm")


def test_dora_copy_is_independent():
    """deepcopy keeps the magnitude a parameter of the copy (used by tools that fork models)."""
    model = get_molora_model(tiny_llama(), dora_config())
    clone = copy.deepcopy(model)
    a, b = (next(iter(m.molora_layers().values())).lora_magnitude for m in (model, clone))
    assert a is not b and torch.equal(a, b)


def test_dora_magnitude_trains_without_weight_decay():
    from molora import get_optimizer_param_groups

    model = get_molora_model(tiny_llama(), dora_config())
    groups = {g["name"]: g for g in get_optimizer_param_groups(model, 1e-3, weight_decay=0.1)}
    assert groups["magnitude"]["weight_decay"] == 0.0 and groups["base"]["weight_decay"] == 0.1
    assert len(groups["magnitude"]["params"]) == len(model.molora_layers())
