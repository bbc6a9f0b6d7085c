"""PiSSA-initialized experts: distinct SVD segments at step 0, the start against the base model
(exact for the task router, within the stated bound for token routers), the base weights never
changed, and after training the saved adapter and the PEFT exports apply to the original base."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, trained
from torch import nn

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core.init import init_pissa_, pissa_factors
from molora.core.layer import MoLoRALinear
from routers import build_router

N, R, TASKS = 4, 2, 3
TARGETS = ["q_proj", "v_proj", "down_proj"]


def pissa_config(router: str = "task", **kw) -> MoLoRAConfig:
    base = dict(target_modules=TARGETS, num_experts=N, r=R, lora_alpha=4, router=router, init_lora_weights="pissa")
    if router == "task":
        base["num_tasks"] = TASKS
    return MoLoRAConfig(**{**base, **kw})


def base_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_llama().state_dict().items()}


def test_pissa_factors_are_distinct_segments_of_the_svd():
    torch.manual_seed(0)
    W = torch.randn(20, 16)
    A, B = pissa_factors(W, N, R, scaling=2.0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for i in range(N):
        seg = slice(i * R, (i + 1) * R)
        torch.testing.assert_close(2.0 * B[i] @ A[i], U[:, seg] @ torch.diag(S[seg]) @ Vh[seg], atol=1e-5, rtol=1e-5)
    products = [B[i] @ A[i] for i in range(N)]
    for i in range(N):
        for j in range(i + 1, N):
            assert (products[i] - products[j]).norm() > 0.1 * products[i].norm()
            assert (A[i] @ A[j].T).abs().max() < 1e-5  # orthogonal row spaces: distinct components


def test_pissa_niter_approximates_the_full_svd():
    torch.manual_seed(0)
    W = torch.randn(64, 8) @ torch.randn(8, 48) + 1e-3 * torch.randn(64, 48)  # a clear top-8 subspace
    A, B = pissa_factors(W, N, R, scaling=1.0, niter=4)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
    approx = torch.einsum("nor,nri->oi", B, A)
    assert (approx - top).norm() / top.norm() < 1e-3


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_task_router_starts_exactly_at_the_base_and_experts_differ(init, top_k):
    ids = torch.randint(0, 128, (3, 9))
    base_logits = tiny_llama()(input_ids=ids).logits
    model = get_molora_model(tiny_llama(), pissa_config(top_k=top_k, init_lora_weights=init, router_init_std=1.0))
    for t in range(TASKS):
        logits = model(input_ids=ids, task_ids=torch.tensor([t] * 3)).logits
        torch.testing.assert_close(logits, base_logits, rtol=1e-5, atol=1e-5)
    for layer in model.molora_layers().values():
        products = torch.einsum("nor,nri->noi", layer.lora_B, layer.lora_A)  # (N, out, in)
        assert products.flatten(1).norm(dim=1).min() > 0  # not the zero-B default init
        assert all((products[i] - products[j]).norm() > 0 for i in range(N) for j in range(i + 1, N))


@pytest.mark.parametrize("router,extra", [("soft", {}), ("topk", {"top_k": 2}), ("topk", {"top_k": 1}),
                                          ("topp", {"top_p": 0.6})])  # fmt: skip
def test_token_router_start_is_within_the_stated_bound(router, extra):
    """||y_start - y_base|| <= max_i |g_i(x) - gbar_i| * ||W0 x|| per token (molora.core.init)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=False)
    kwargs = (
        {"top_k": extra.get("top_k")} if router == "topk" else {"top_p": extra["top_p"]} if router == "topp" else {}
    )
    rt = build_router(router, 24, num_experts=N, init_std=0.5, **kwargs)
    layer = MoLoRALinear(base, num_experts=N, r=R, lora_alpha=4, router=rt, expert_impl="dense", pissa=True)
    init_pissa_(layer, "pissa")
    x = torch.randn(50, 24)
    with torch.no_grad():
        gap = (layer(x) - base(x)).norm(dim=1)  # (T,)
        gates = layer.last_routing.weights  # (T, N)
        bound = (gates - layer.pissa_gates).abs().amax(dim=1) * base(x).norm(dim=1)
    assert (gap <= bound * (1 + 1e-4) + 1e-5).all()
    assert gap.max() > 0  # token routing does move the start: the bound is not vacuous here


def test_base_weights_are_never_changed_and_unload_gives_them_back():
    before = base_state()
    model = get_molora_model(tiny_llama(), pissa_config())
    ids = torch.randint(0, 128, (3, 9))
    trained(model, ids, torch.tensor([0, 1, 2]), steps=2, lr=0.02)
    after = model.unload().state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("top_k", [None, 2])
def test_trained_pissa_adapter_and_exports_apply_to_the_original_base(tmp_path, top_k):
    pytest.importorskip("peft")
    from peft import PeftModel

    ids = torch.randint(0, 128, (3, 9))
    model = trained(
        get_molora_model(tiny_llama(), pissa_config(top_k=top_k)), ids, torch.tensor([0, 1, 2]), steps=2, lr=0.02
    )
    routed = {t: model(input_ids=ids, task_ids=torch.tensor([t] * 3)).logits for t in range(TASKS)}
    model.save_pretrained(tmp_path / "adapter")
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), tmp_path / "adapter")  # a fresh, original base
    for t in range(TASKS):
        torch.testing.assert_close(loaded(input_ids=ids, task_ids=torch.tensor([t] * 3)).logits, routed[t])
    report = model.export_merged_adapter(tmp_path / "tasks", task="all")
    k = top_k or N
    for t in range(TASKS):
        # stated rank: r per expert with w_i != 0 plus r per expert in the task's frozen residual
        assert all(entry["rank"] == 2 * k * R for entry in report[f"task_{t}"]["layers"].values())
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "tasks" / f"task_{t}")).eval()
        assert not peft_model.peft_config["default"].use_dora
        torch.testing.assert_close(peft_model(input_ids=ids).logits, routed[t], rtol=1e-4, atol=1e-4)
    merged = model.merge_and_unload(task=2)
    torch.testing.assert_close(merged(input_ids=ids).logits, routed[2], rtol=1e-4, atol=1e-4)


def test_token_router_pissa_export_applies_to_the_original_base(tmp_path):
    """A soft router with a zero gate weight routes uniformly, so a uniform static merge is exact."""
    pytest.importorskip("peft")
    from peft import PeftModel

    ids = torch.randint(0, 128, (3, 9))
    model = trained(get_molora_model(tiny_llama(), pissa_config("soft")), ids, None, steps=2, lr=0.02)
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.router.weight.zero_()
    routed = model(input_ids=ids).logits
    report = model.export_merged_adapter(tmp_path / "u", weights="uniform")
    assert all(entry["rank"] == 2 * N * R for entry in report["layers"].values())
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "u")).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, routed, rtol=1e-4, atol=1e-4)
    svd = model.export_merged_adapter(tmp_path / "auto", weights="uniform", rank="auto", tolerance=1e-6)
    assert svd["method"] in ("cat", "svd")


def test_pissa_task_router_export_needs_a_task(tmp_path):
    model = get_molora_model(tiny_llama(), pissa_config())
    with pytest.raises(ValueError, match="merges per task"):
        model.export_merged_adapter(tmp_path / "x", weights="uniform")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(share_lora_A=True), "one A per expert"),
        (dict(use_dora=True), "cannot be combined with use_dora"),
        (dict(init_lora_weights="pissa_niter_0"), "pissa_niter_K"),
        (dict(init_lora_weights="olora"), "init_lora_weights"),
    ],
)
def test_pissa_bad_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        pissa_config(**kw)


def test_pissa_rank_above_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"num_experts \* r <= min\(in, out\)"):
        get_molora_model(tiny_llama(), pissa_config(num_experts=8, r=8))


def test_from_lora_adapters_refuses_pissa(tmp_path):
    with pytest.raises(ValueError, match="cannot be used with from_lora_adapters"):
        MoLoRAModel.from_lora_adapters(tiny_llama(), [tmp_path / "a"] * N, pissa_config())


def test_pissa_training_run_config_builds(tmp_path):
    """`molora.init_lora_weights=pissa_niter_2` as a dotted override validates like any field."""
    from conftest import TINY_CONFIG

    from molora.training.run_config import load_run_config

    cfg = load_run_config(TINY_CONFIG, ["molora.init_lora_weights=pissa_niter_2", "molora.router=task"])
    assert cfg.molora.init_lora_weights == "pissa_niter_2"


@pytest.mark.parametrize(
    ("molora_section", "shown"),
    [
        ({"use_dora": True, "init_lora_weights": True}, "experts=4 (DoRA),"),
        ({"use_dora": False, "init_lora_weights": "pissa_niter_4"}, "experts=4 (PiSSA init pissa_niter_4),"),
        ({"use_dora": False, "init_lora_weights": True}, "experts=4,"),
    ],
)
def test_inspect_names_the_expert_variant_of_a_run(tmp_path, molora_section, shown):
    """`molora inspect` said "router=task, experts=4" for a DoRA or PiSSA run alike."""
    import json

    import yaml

    from molora.apps.commands.inspect import summarize

    summary = dict(steps=2, router="task", num_experts=4, num_processes=1, mixed_precision="no", wall_time_s=1.0)
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "trainable_params": 10, "total_params": 100}))
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({"molora": {"num_experts": 4, **molora_section}}))
    assert shown in summarize(tmp_path, [], None)
