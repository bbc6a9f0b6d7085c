"""vLLM-ready exports, rank="auto", the vLLM rules validator and the fidelity of static merges."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, tiny_llama

from molora import MoLoRAConfig, get_molora_model, measure_gates
from molora.merge.fidelity import format_fidelity_table
from molora.merge.rank import format_rank_table
from molora.merge.vllm import VLLM_RANKS, check_vllm_adapter, vllm_rank

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n=2, batch=2, seq=7, tasks=2):
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(10 + s)
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # right padding on one row
        labels = ids.masked_fill(mask == 0, -100)
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.arange(batch) % tasks}
        )
    return out


def _trained(**cfg_kw):
    """(MoLoRA model after one AdamW step, untouched copy of its base)."""
    base = tiny_llama().train()
    fresh = copy.deepcopy(base)
    cfg = MoLoRAConfig(**{"target_modules": TARGETS, "num_experts": 4, "r": 2, "lora_alpha": 8, **cfg_kw})
    model = get_molora_model(base, cfg)
    batch = _batches(1)[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    model.eval()
    return model, fresh


def _peft(fresh, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(fresh), str(path)).eval()


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits


def _fidelity_by_hand(model, peft_model, batches, task=None):
    """mean KL, max |dlogit|, both losses, recomputed with PEFT on the exported folder."""
    kl = count = ce_r = ce_e = n_labels = 0.0
    diff = 0.0
    for b in batches:
        rows = torch.arange(b["input_ids"].shape[0]) if task is None else (b["task_ids"] == task).nonzero().flatten()
        b = {k: v[rows] for k, v in b.items()}
        routed = _logits(model, b, task_ids=b["task_ids"]).double()
        exported = _logits(peft_model, b).double()
        real = b["attention_mask"].bool()
        p_r, p_e = routed.log_softmax(-1), exported.log_softmax(-1)
        kl += float(((p_r.exp() * (p_r - p_e)).sum(-1))[real].sum())
        count += int(real.sum())
        diff = max(diff, float((routed - exported).abs().amax(-1)[real].max()))
        labels = b["labels"][:, 1:]
        for logits, acc in ((routed, "r"), (exported, "e")):
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
            if acc == "r":
                ce_r += float(ce)
            else:
                ce_e += float(ce)
        n_labels += int((labels != -100).sum())
    return {
        "mean_kl": kl / count,
        "max_abs_logit_diff": diff,
        "loss_routed": ce_r / n_labels,
        "loss_exported": ce_e / n_labels,
    }


def _assert_vllm_folder(path, rank):
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == rank == cfg["lora_alpha"] and rank in VLLM_RANKS
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and not cfg["modules_to_save"]
    assert cfg["bias"] == "none" and cfg["use_dora"] is False
    for key, t in load_file(str(path / "adapter_model.safetensors")).items():
        assert (t.shape[0] if "lora_A" in key else t.shape[1]) == rank
    assert check_vllm_adapter(path, max_lora_rank=rank) == []


# --------------------------------------------------------------------------- exports


def test_task_router_vllm_cat_padded_up_is_exact(tmp_path):
    model, fresh = _trained(router="task", num_tasks=2, top_k=2, task_names=["sum", "copy"])
    batches = _batches()
    reports = model.export_merged_adapter(tmp_path / "v", task="all", target="vllm", eval_batches=batches)
    for t, name in enumerate(["sum", "copy"]):
        rep = reports[name]
        assert rep["max_lora_rank"] == 8 and "--max-lora-rank 8" in rep["serve"]  # cat rank 2 * 2 = 4, padded to 8
        assert all(row["rank"] == 8 for row in rep["layers"].values())
        _assert_vllm_folder(tmp_path / "v" / name, 8)
        peft_model = _peft(fresh, tmp_path / "v" / name)
        b = batches[0]
        torch.testing.assert_close(
            _logits(peft_model, b), _logits(model, b, task_ids=torch.full((2,), t)), atol=1e-5, rtol=1e-4
        )
        fid = rep["fidelity"]
        assert set(fid["tasks"]) == {name}  # a task's adapter is measured on that task's rows
        assert fid["mean_kl"] < 1e-6 and fid["max_abs_logit_diff"] < 1e-4
        assert fid["loss_exported"] == pytest.approx(fid["loss_routed"], abs=1e-5)
        again = _fidelity_by_hand(model, peft_model, batches, task=t)
        for key in ("loss_routed", "loss_exported"):
            assert fid[key] == pytest.approx(again[key], rel=1e-5)
    saved = json.loads((tmp_path / "v" / "copy" / "merge_report.json").read_text())
    assert saved["fidelity"] == json.loads(json.dumps(reports["copy"]["fidelity"]))
    assert "max|dlogit|" in format_fidelity_table(reports)


def test_topk_measured_gates_vllm_svd_fidelity_is_what_peft_sees(tmp_path):
    model, fresh = _trained(router="topk", top_k=2)
    batches = _batches(3)
    gates = measure_gates(model, batches)
    rep = model.export_merged_adapter(
        tmp_path / "s", weights=gates, method="svd", rank=3, target="vllm", eval_batches=batches
    )
    assert rep["max_lora_rank"] == 8 and rep["method"] == "svd"
    assert all(0 < row["rel_error"] < 1 for row in rep["layers"].values())  # rank 3 < rank(dW) = 8
    _assert_vllm_folder(tmp_path / "s", 8)
    fid = rep["fidelity"]
    again = _fidelity_by_hand(model, _peft(fresh, tmp_path / "s"), batches)
    for key, value in again.items():
        assert fid[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert fid["mean_kl"] > 0 and set(fid["tasks"]) == {"0", "1"}
    assert json.loads((tmp_path / "s" / "merge_report.json").read_text())["fidelity"]["mean_kl"] == fid["mean_kl"]
    table = format_fidelity_table({"topk svd3": rep})
    assert "topk svd3" in table and f"{fid['mean_kl']:.3e}" in table


def test_cat_vllm_with_zero_experts_matches_peft(tmp_path):
    model, fresh = _trained(router="soft")
    gates = {n: torch.tensor([0.5, 0.0, 0.5, 0.0]) for n in model.molora_layers()}
    rep = model.export_merged_adapter(tmp_path / "c", weights=gates, target="vllm")
    assert rep["max_lora_rank"] == 8 and rep["method"] == "cat"  # rank 4 padded to 8
    _assert_vllm_folder(tmp_path / "c", 8)
    ref = model.export_merged_adapter(tmp_path / "p", weights=gates)  # the plain PEFT export, rank 4
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 4 and ref["target"] == "peft"
    b = _batches(1)[0]
    torch.testing.assert_close(
        _logits(_peft(fresh, tmp_path / "c"), b), _logits(_peft(fresh, tmp_path / "p"), b), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("target", ["peft", "vllm"])
def test_auto_rank_is_smallest_within_tolerance(tmp_path, target):
    model, fresh = _trained(router="soft", r=4)
    gates = {n: torch.tensor([0.4, 0.3, 0.2, 0.1]) for n in model.molora_layers()}
    rep = model.export_merged_adapter(tmp_path / "a", weights=gates, rank="auto", tolerance=0.3, target=target)
    auto = rep["auto"]
    chosen = next(row for row in auto["table"] if row["rank"] == auto["rank"])
    assert chosen["max_rel_error"] <= 0.3
    assert max(row["rel_error"] for row in rep["layers"].values()) == pytest.approx(chosen["max_rel_error"])
    if target == "peft":
        assert auto["rank"] >= 2 and auto["method"] == "svd"
        smaller = model.export_merged_adapter(tmp_path / "b", weights=gates, method="svd", rank=auto["rank"] - 1)
        assert max(row["rel_error"] for row in smaller["layers"].values()) > 0.3
    else:
        assert auto["rank"] in VLLM_RANKS and all(row["rank"] in VLLM_RANKS for row in auto["table"])
        _assert_vllm_folder(tmp_path / "a", rep["max_lora_rank"])
    assert "<- chosen" in format_rank_table(auto)
    # an exact tolerance: "cat" when it is not larger (cat rank 16 = vLLM 16; PEFT: exact rank = 16)
    exact = model.export_merged_adapter(tmp_path / "e", weights=gates, rank="auto", tolerance=0.0, target=target)
    assert exact["method"] == "cat" and exact["auto"]["cat_rank"] == 16
    b = _batches(1)[0]
    want = _logits(_peft(fresh, tmp_path / "e"), b)
    full = model.export_merged_adapter(tmp_path / "f", weights=gates)  # plain exact PEFT export
    torch.testing.assert_close(want, _logits(_peft(fresh, tmp_path / "f"), b), atol=1e-5, rtol=1e-4)
    assert full["method"] == "cat"


def test_vllm_export_refuses_modules_to_save(tmp_path):
    from transformers import LlamaForSequenceClassification

    base = tiny_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0)
    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="soft", modules_to_save=["score"])
    model = get_molora_model(base, cfg)
    with pytest.raises(ValueError, match=r"modules_to_save=\['score'\]"):
        model.export_merged_adapter(tmp_path / "x", target="vllm")
    with pytest.raises(ValueError, match="`target` must be one of"):
        model.export_merged_adapter(tmp_path / "x", target="tgi")
    assert not (tmp_path / "x").exists()


def test_vllm_rank():
    assert [vllm_rank(k) for k in (1, 2, 8, 9, 300, 321, 512)] == [1, 8, 8, 16, 320, 512, 512]  # vLLM 0.34 allows 1
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_rank(513)


# --------------------------------------------------------------------------- validator


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    model, fresh = _trained(router="soft")
    path = tmp_path_factory.mktemp("vllm") / "good"
    model.export_merged_adapter(path, target="vllm")
    return path, fresh


def _mutate(src, dst, config=None, tensors=None, drop=()):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    for key in drop:
        del cfg[key]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(str(src / "adapter_model.safetensors"))
    if tensors:
        weights = tensors(weights)
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


def _first(weights, suffix):
    return next(k for k in sorted(weights) if k.endswith(suffix))


BAD = {  # vLLM 0.34's rules (vllm/lora/peft_helper.py, lora_model.py)
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "dora": ({"use_dora": True}, None, "DoRA"),
    "bias": ({"bias": "lora_only"}, None, "bias='lora_only'"),
    "lora_bias": ({"lora_bias": True}, None, "LoRA bias (lora_bias)"),
    "pissa": ({"init_lora_weights": "pissa"}, None, "init_lora_weights='pissa'"),
    "pissa_niter": ({"init_lora_weights": "pissa_niter_4"}, None, "init_lora_weights='pissa_niter_4'"),
    "olora": ({"init_lora_weights": "olora"}, None, "init_lora_weights='olora'"),
    "corda": ({"init_lora_weights": "corda"}, None, "init_lora_weights='corda'"),
    "loftq": ({"init_lora_weights": "loftq"}, None, "init_lora_weights='loftq'"),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, None, "layer_replication"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, None, "Conv1D"),
    "layers_to_transform": ({"layers_to_transform": [0]}, None, "vLLM ignores it"),
    "rank_too_big": ({"r": 640, "lora_alpha": 640}, None, "above vLLM's largest"),
    "pattern_rank_too_big": ({"rank_pattern": {"q_proj": 640}}, None, "largest rank_pattern rank=640"),
    "pattern_rank_not_int": ({"rank_pattern": {"q_proj": 0}}, None, "rank_pattern values must be ints"),
    "no_alpha": ({}, None, "lacks ['lora_alpha']"),  # the key is dropped, see the test
    "not_lora": ({"peft_type": "IA3"}, None, "peft_type"),
    "rank_mismatch": (None, lambda w: {**w, _first(w, "lora_A.weight"): w[_first(w, "lora_A.weight")][:4]}, "rank 8"),
    "pattern_rank_mismatch": ({"rank_pattern": {"q_proj": 4}}, None, "with rank 4"),
    "extra_tensor": (None, lambda w: {**w, "base_model.model.score.weight": torch.zeros(3, 32)}, "not a LoRA factor"),
    "bias_tensor": (
        None,
        lambda w: {**w, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(32)},
        "adapter bias",
    ),
    "half_module": (None, lambda w: {k: v for k, v in w.items() if k != _first(w, "lora_B.weight")}, "not both"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_validator_flags_each_rule(good_adapter, tmp_path, kind):
    src, _ = good_adapter
    config, tensors, message = BAD[kind]
    drop = ["lora_alpha"] if kind == "no_alpha" else []
    problems = check_vllm_adapter(_mutate(src, tmp_path / kind, config, tensors, drop))
    assert problems and any(message in p for p in problems), problems


def test_validator_good_adapter_rank_limit_and_base(good_adapter, tmp_path):
    src, fresh = good_adapter
    assert check_vllm_adapter(src) == [] and check_vllm_adapter(src, base_model=fresh) == []
    small = _mutate(
        src,
        tmp_path / "r16",
        {"r": 16, "lora_alpha": 16},
        lambda w: {k: torch.cat([v, torch.zeros_like(v)], dim=0 if "lora_A" in k else 1) for k, v in w.items()},
    )
    assert check_vllm_adapter(small, max_lora_rank=16) == []
    assert any("greater than max_lora_rank=8" in p for p in check_vllm_adapter(small, max_lora_rank=8))
    assert any("must be one of" in p for p in check_vllm_adapter(src, max_lora_rank=12))
    other = tiny_llama(hidden_size=48, num_attention_heads=4)
    assert any("needs 48" in p for p in check_vllm_adapter(src, base_model=other))
    wrong = _mutate(src, tmp_path / "targets", {"target_modules": ["q_proj", "wq"]})
    assert any("['wq'] are not modules of the model" in p for p in check_vllm_adapter(wrong, base_model=fresh))
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json is missing" in check_vllm_adapter(tmp_path / "empty")[0]


def test_validator_accepts_what_vllm_034_accepts(good_adapter, tmp_path):
    """rank_pattern / alpha_pattern are applied per module, --max-lora-rank 1 exists, classification
    heads in modules_to_save and plain inits load (vLLM 0.34's peft_helper.py)."""
    src, fresh = good_adapter
    q_keys = lambda w: [k for k in w if ".q_proj." in k]  # noqa: E731
    patterned = _mutate(
        src,
        tmp_path / "pattern",
        {"rank_pattern": {"q_proj": 16}, "alpha_pattern": {"q_proj": 32}},
        lambda w: {
            k: (torch.cat([v, torch.zeros_like(v)], dim=0 if "lora_A" in k else 1) if k in q_keys(w) else v)
            for k, v in w.items()
        },
    )
    assert check_vllm_adapter(patterned, base_model=fresh) == []
    assert any("largest rank_pattern rank=16 is greater than max_lora_rank=8" in p for p in check_vllm_adapter(patterned, max_lora_rank=8))
    rank1 = _mutate(
        src, tmp_path / "r1", {"r": 1, "lora_alpha": 1}, lambda w: {k: (v[:1] if "lora_A" in k else v[:, :1]).contiguous() for k, v in w.items()}
    )
    assert check_vllm_adapter(rank1, max_lora_rank=1) == []
    head = _mutate(
        src, tmp_path / "head", {"modules_to_save": ["score"], "init_lora_weights": "gaussian"},
        lambda w: {**w, "base_model.model.score.weight": torch.zeros(3, 32)},
    )
    assert check_vllm_adapter(head) == []


def test_check_vllm_cli_names_the_rules_version_and_what_is_not_checked(good_adapter, tmp_path, capsys):
    from molora.apps.cli import main

    src, _ = good_adapter
    assert main(["check-vllm", str(src), "--max-lora-rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "vLLM 0.34" in out and "not checked: whether vLLM supports LoRA for the base model's architecture" in out
    bad = _mutate(src, tmp_path / "pissa", {"init_lora_weights": "pissa"})
    assert main(["check-vllm", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "init_lora_weights='pissa'" in out and "vLLM 0.34" in out
