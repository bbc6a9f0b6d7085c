"""Expert structures on whole models: save/load, PEFT exports, merge_and_unload, config errors.

Forms: a shared A (HydraLoRA, ``share_lora_A``), shared experts (``num_shared_experts``) and
per-layer patterns (``rank_pattern``, ``alpha_pattern``, ``num_experts_pattern``,
``top_k_pattern``). Exports are loaded by ``peft.PeftModel.from_pretrained`` and compared with
the routed model after one optimizer step (B starts at zero).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import random_batch, tiny_llama, train_steps

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model

TASK_IDS = torch.tensor([0, 1])
PATTERNS = {
    "rank_pattern": {"v_proj": 4},
    "alpha_pattern": {"layers.1.self_attn.q_proj": 3.0},
    "num_experts_pattern": {r"layers\.1\.self_attn\.(q|v)_proj": 5},
    "top_k_pattern": {"layers.0.self_attn.v_proj": 1},
}
FORMS = {
    "hydra": {"share_lora_A": True},
    "shared": {"num_shared_experts": 2},
    "hydra_shared": {"share_lora_A": True, "num_shared_experts": 1},
    "patterns": PATTERNS,
    "all": {"share_lora_A": True, "num_shared_experts": 1, **PATTERNS},
}


def config(form: str, router: str = "task", **overrides) -> MoLoRAConfig:
    top_k = 2 if router == "topk" else None
    kw = dict(target_modules=["q_proj", "v_proj"], num_experts=3, r=2, router=router, num_tasks=2, top_k=top_k)
    return MoLoRAConfig(**{**kw, **FORMS[form], **overrides})


def trained(form: str, router: str = "task", **overrides) -> MoLoRAModel:
    model = get_molora_model(tiny_llama(), config(form, router, **overrides))
    train_steps(model, random_batch(), steps=1, lr=3e-2, task_ids=TASK_IDS)
    return model


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def peft_logits(path, ids) -> tuple[torch.Tensor, object]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    return logits(peft_model, ids), peft_model


# --------------------------------------------------------------------------- structure


def test_structure_of_each_layer_and_parameter_counts():
    model = get_molora_model(tiny_llama(), config("all", router="topk"))
    summary = model.layer_summary()
    q0, v0 = summary["model.layers.0.self_attn.q_proj"], summary["model.layers.0.self_attn.v_proj"]
    q1, v1 = summary["model.layers.1.self_attn.q_proj"], summary["model.layers.1.self_attn.v_proj"]
    assert (q0["num_experts"], q0["r"], q0["top_k"], q0["lora_alpha"]) == (3, 2, 2, 16)
    assert (v0["num_experts"], v0["r"], v0["top_k"]) == (3, 4, 1)
    assert (q1["num_experts"], q1["r"], q1["lora_alpha"], q1["scaling"]) == (5, 2, 3.0, 1.5)
    assert (v1["num_experts"], v1["r"]) == (5, 4)
    assert all(s["share_lora_A"] and s["num_shared_experts"] == 1 for s in summary.values())
    layer = model.molora_layers()["model.layers.1.self_attn.v_proj"]
    assert layer.lora_A.shape == (1, 4, 32) and layer.lora_B.shape == (5, 16, 4)  # v_proj: 32 -> 16
    assert layer.lora_A_shared.shape == (1, 4, 32) and layer.lora_B_shared.shape == (1, 16, 4)
    assert layer.router.weight.shape[0] == 5


def test_hydra_trains_fewer_parameters_than_plain():
    """q_proj and v_proj of the tiny Llama (hidden 32, kv 16): N=4, r=2."""
    kw = dict(target_modules=["q_proj", "v_proj"], num_experts=4, r=2, router="topk")
    plain = get_molora_model(tiny_llama(), MoLoRAConfig(**kw)).get_nb_trainable_parameters()[0]
    hydra = get_molora_model(tiny_llama(), MoLoRAConfig(**kw, share_lora_A=True)).get_nb_trainable_parameters()[0]
    shared = get_molora_model(tiny_llama(), MoLoRAConfig(**kw, num_shared_experts=1)).get_nb_trainable_parameters()[0]
    # per layer: A saves (N - 1) * r * in = 3 * 2 * 32; a shared expert adds r * (in + out)
    assert plain - hydra == 4 * 3 * 2 * 32
    assert shared - plain == 2 * (2 * 32 + 2 * 32) + 2 * (2 * 32 + 2 * 16)


@pytest.mark.parametrize("form", ["hydra", "shared", "patterns"])
def test_zero_B_leaves_the_base_unchanged(form):
    ids = random_batch()["input_ids"]
    want = logits(tiny_llama(), ids)
    model = get_molora_model(tiny_llama(), config(form))
    torch.testing.assert_close(logits(model, ids, task_ids=TASK_IDS), want, rtol=0, atol=0)


def test_balancing_loss_ignores_shared_experts():
    from molora.core.losses import load_balancing_loss

    model = get_molora_model(tiny_llama(), config("shared", router="topk"))
    model(**random_batch())
    layers = model.molora_layers().values()
    want = torch.stack([load_balancing_loss(l.last_routing.logits, l.last_routing.indices) for l in layers]).mean()
    torch.testing.assert_close(model.aux_loss(), want)
    assert all(s["load"].shape == (3,) for s in model.routing_stats().values())


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("form", list(FORMS))
def test_save_load_round_trip_gives_identical_logits(tmp_path, form):
    router = "topk" if form == "all" else "task"
    model = trained(form, router)
    ids = random_batch()["input_ids"]
    want = logits(model, ids, task_ids=TASK_IDS)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "molora_config.json").read_text())
    for name, layer in model.molora_layers().items():
        assert meta["modules"][name]["num_experts"] == layer.num_experts and meta["modules"][name]["r"] == layer.r
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.molora_config == model.molora_config
    torch.testing.assert_close(logits(loaded, ids, task_ids=TASK_IDS), want, rtol=0, atol=0)


def test_load_checks_per_layer_structure_against_metadata(tmp_path):
    model = trained("patterns")
    model.save_pretrained(tmp_path)
    meta_path = tmp_path / "molora_config.json"
    meta = json.loads(meta_path.read_text())
    meta["modules"]["model.layers.0.self_attn.v_proj"]["r"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"base model layer 'model\.layers\.0\.self_attn\.v_proj'.*'r': 2"):
        MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    for entry in meta["modules"].values():  # an adapter saved before N and r were recorded
        del entry["num_experts"], entry["r"]
    meta_path.write_text(json.dumps(meta))
    MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)


def test_load_on_a_base_the_patterns_do_not_fit(tmp_path):
    trained("patterns").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`num_experts_pattern` key .* matches no targeted layer"):
        MoLoRAModel.from_pretrained(tiny_llama(num_hidden_layers=1), tmp_path)


# --------------------------------------------------------------------------- export


def test_hydra_task_export_is_exact_at_rank_r(tmp_path):
    pytest.importorskip("peft")
    model = trained("hydra")
    ids = random_batch()["input_ids"]
    assert all(l.lora_B.abs().sum() > 0 for l in model.molora_layers().values())  # one step: B is no longer 0
    assert not torch.allclose(logits(model, ids, task_ids=TASK_IDS), logits(tiny_llama(), ids), atol=1e-3)
    report = model.export_merged_adapter(tmp_path / "tasks", task="all")
    for tid in (0, 1):
        folder = tmp_path / "tasks" / f"task_{tid}"
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["r"] == 2 and adapter["rank_pattern"] == {}
        assert all(layer["rank"] == 2 for layer in report[f"task_{tid}"]["layers"].values())
        got, _ = peft_logits(folder, ids)
        want = logits(model, ids, task_ids=torch.tensor([tid, tid]))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    svd = model.export_merged_adapter(tmp_path / "svd", task=1, method="svd")  # default rank r: exact too
    assert all(layer["rank"] == 2 and layer["rel_error"] < 1e-5 for layer in svd["layers"].values())


@pytest.mark.parametrize(("form", "ranks"), [("shared", {3 * 2 + 2 * 2}), ("hydra_shared", {2 + 2}), ("all", None)])
def test_shared_experts_export_with_weight_one(tmp_path, form, ranks):
    pytest.importorskip("peft")
    model = trained(form)
    ids = random_batch()["input_ids"]
    report = model.export_merged_adapter(tmp_path / "t1", task=1)
    got, peft_model = peft_logits(tmp_path / "t1", ids)
    torch.testing.assert_close(got, logits(model, ids, task_ids=torch.tensor([1, 1])), rtol=1e-4, atol=1e-4)
    found = {name: layer["rank"] for name, layer in report["layers"].items()}
    if ranks is not None:
        assert set(found.values()) == ranks
    else:  # per layer: r (shared A) + 1 shared expert of rank r
        assert found == {n: 2 * l.r for n, l in model.molora_layers().items()}
    for name, rank in found.items():
        assert peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == rank


def test_patterns_export_per_layer_ranks_cat_and_svd(tmp_path):
    pytest.importorskip("peft")
    model = trained("patterns")
    ids = random_batch()["input_ids"]
    report = model.export_merged_adapter(tmp_path / "cat", task=0)
    # cat keeps the experts with a non-zero gate: all of them, but top-1 on layers.0's v_proj
    want_cat = {n: int((l.router.task_weights(0) != 0).sum()) * l.r for n, l in model.molora_layers().items()}
    assert want_cat["model.layers.0.self_attn.v_proj"] == 4 and want_cat["model.layers.1.self_attn.q_proj"] == 5 * 2
    assert {n: layer["rank"] for n, layer in report["layers"].items()} == want_cat
    adapter = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert adapter["rank_pattern"]  # several ranks: PEFT's rank_pattern
    got, _ = peft_logits(tmp_path / "cat", ids)
    torch.testing.assert_close(got, logits(model, ids, task_ids=torch.tensor([0, 0])), rtol=1e-4, atol=1e-4)
    svd = model.export_merged_adapter(tmp_path / "svd", task=0, method="svd")  # default: each layer's own r
    assert {n: layer["rank"] for n, layer in svd["layers"].items()} == {
        n: l.r for n, l in model.molora_layers().items()
    }
    peft_logits(tmp_path / "svd", ids)  # loads with per-module ranks


@pytest.mark.parametrize("form", ["hydra_shared", "all"])
def test_merge_and_unload_folds_every_structure(form):
    model = trained(form)
    ids = random_batch()["input_ids"]
    want = logits(model, ids, task_ids=torch.tensor([1, 1]))
    merged = model.merge_and_unload(task=1)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-4, atol=1e-4)


def test_hydra_cat_factors_are_rank_r_and_exact():
    from molora.merge.factors import cat_factors, dense_delta

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(1, 3, 11, generator=g), torch.randn(4, 7, 3, generator=g)
    shared = (torch.randn(2, 3, 11, generator=g), torch.randn(2, 7, 3, generator=g))
    w = torch.tensor([0.1, 0.0, 0.5, 0.4])
    ref = sum(1.5 * w[i] * B[i] @ A[0] for i in range(4)) + sum(1.5 * shared[1][j] @ shared[0][j] for j in range(2))
    f = cat_factors(A, B, w, 1.5, shared)
    assert f.lora_A.shape == (3 + 2 * 3, 11) and f.lora_B.shape == (7, 3 + 2 * 3)
    torch.testing.assert_close(f.lora_B @ f.lora_A, ref)
    torch.testing.assert_close(dense_delta(A, B, w, 1.5, shared), ref)
    assert cat_factors(A, B, torch.zeros(4), 1.5).lora_A.shape == (0, 11)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"share_lora_A": "yes"}, r"`share_lora_A` must be True or False, got 'yes'"),
        ({"num_shared_experts": -1}, r"`num_shared_experts` must be an int >= 0, got -1"),
        ({"num_shared_experts": 1.5}, r"`num_shared_experts` must be an int >= 0, got 1\.5"),
        ({"rank_pattern": {"q_proj": 0}}, r"`rank_pattern\['q_proj'\]` must be an int >= 1, got 0"),
        ({"num_experts_pattern": {"q_proj": True}}, r"`num_experts_pattern\['q_proj'\]` must be an int >= 1, got True"),
        ({"alpha_pattern": {"q_proj": -1.0}}, r"`alpha_pattern\['q_proj'\]` must be a number > 0, got -1\.0"),
        ({"top_k_pattern": {"q_proj": "2"}}, r"`top_k_pattern\['q_proj'\]` must be an int >= 1, got '2'"),
        ({"rank_pattern": ["q_proj"]}, r"`rank_pattern` must be a dict"),
        ({"rank_pattern": {"q_proj(": 2}}, r"`rank_pattern` key 'q_proj\(' is not a valid regular expression"),
        (
            {"router": "soft", "top_k": None, "top_k_pattern": {"q_proj": 1}},
            r"`top_k_pattern` must be empty for router='soft'",
        ),
    ],
)
def test_config_errors_name_the_field(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoLoRAConfig(**{"target_modules": ["q_proj"], **kw})


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (
            {"rank_pattern": {"k_proj": 4}},
            r"`rank_pattern` key 'k_proj' matches no targeted layer; targeted layers are e\.g\. \['model\.layers\.0",
        ),
        (
            {"top_k_pattern": {"layers.9.self_attn.q_proj": 1}},
            r"`top_k_pattern` key 'layers\.9\.self_attn\.q_proj' matches no targeted layer",
        ),
        (
            {"num_experts_pattern": {"q_proj": 1}},
            r"layer 'model\.layers\.0\.self_attn\.q_proj': `top_k`=2 must be <= its num_experts=1",
        ),
        (
            {"top_k_pattern": {"v_proj": 4}},
            r"layer 'model\.layers\.0\.self_attn\.v_proj': `top_k`=4 must be <= its num_experts=3",
        ),
    ],
)
def test_patterns_are_checked_against_the_layers_before_injection(kw, pattern):
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=pattern):
        get_molora_model(base, MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="topk", **kw))
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert all(p.requires_grad for p in base.parameters()) and base.state_dict().keys() == before.keys()


def test_first_matching_key_wins():
    cfg = MoLoRAConfig(target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 4, "q_proj": 6})
    specs = cfg.layer_specs(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"])
    assert [s.r for s in specs.values()] == [6, 4]


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"share_lora_A": True}, r"`share_lora_A=True` cannot be built from LoRA adapters: each adapter has its own A"),
        ({"num_experts_pattern": {"q_proj": 3}}, r"`num_experts_pattern`=.* cannot be used with from_lora_adapters"),
    ],
)
def test_from_lora_adapters_refuses_structures_adapters_cannot_fill(tmp_path, kw, pattern):
    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=2, **kw)
    base = tiny_llama()
    with pytest.raises(ValueError, match=pattern):
        MoLoRAModel.from_lora_adapters(base, [tmp_path / "a", tmp_path / "b"], cfg)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # nothing injected


def test_config_round_trips_through_json_with_patterns(tmp_path):
    cfg = config("all", router="topk")
    cfg.save(tmp_path / "c.json")
    assert MoLoRAConfig.load(tmp_path / "c.json") == cfg


def test_run_config_takes_the_new_fields(tiny_config_path):
    from molora.training.run_config import load_run_config

    overrides = [
        "molora.share_lora_A=true",
        "molora.num_shared_experts=1",
        "molora.rank_pattern={v_proj: 4}",
        "molora.num_experts_pattern.q_proj=3",
    ]
    cfg = load_run_config(tiny_config_path, overrides).molora
    assert cfg.share_lora_A and cfg.num_shared_experts == 1
    assert cfg.rank_pattern == {"v_proj": 4} and cfg.num_experts_pattern == {"q_proj": 3}


def test_molora_train_runs_hydra_with_shared_experts_and_patterns(tmp_path):
    """`molora train` on configs/tiny.yaml with the new fields; the per-task exports have rank r + M*r."""
    from conftest import TINY_CONFIG, tiny_run_overrides

    from molora.cli import main

    extra = {
        "molora.router": "task",
        "molora.num_tasks": 2,
        "molora.top_k": "null",
        "molora.share_lora_A": "true",
        "molora.num_shared_experts": 1,
        "molora.num_experts_pattern": "{layers.1.mlp.down_proj: 6}",
        "molora.expert_impl": "auto",
        "train.max_steps": 2,
        "train.save_every": 0,
        "train.eval_every": 0,
    }
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "hydra", extra)]) == 0
    run = tmp_path / "hydra"
    meta = json.loads((run / "final" / "molora_config.json").read_text())
    assert meta["modules"]["model.layers.1.mlp.down_proj"]["num_experts"] == 6
    for task in ("reverse", "sort"):
        report = json.loads((run / "export" / task / "merge_report.json").read_text())
        assert {layer["rank"] for layer in report["layers"].values()} == {4 + 4}  # r + M*r (tiny.yaml: r=4)
