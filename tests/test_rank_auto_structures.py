"""rank="auto" with shared experts, a shared A and exact ranks above vLLM's largest (512): the
cat rank is counted from the structure, the report's rank is the written adapter's rank, and
vLLM candidates stop at 512."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_llama

from molora import MoLoRAConfig, get_molora_model

pytest.importorskip("peft")


def _random_adapter(seed: int = 0, **cfg_kw):
    """A MoLoRA model whose every factor is random (as after training), in eval mode."""
    base_kw = cfg_kw.pop("base", {})
    model = get_molora_model(
        tiny_llama(**base_kw), MoLoRAConfig(**{"target_modules": ["q_proj"], "router": "soft", **cfg_kw})
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _written_rank(folder) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["r"]


def test_shared_experts_count_in_the_cat_rank_and_the_report_says_the_written_rank(tmp_path):
    model = _random_adapter(num_experts=4, r=2, num_shared_experts=1)
    for layer in model.molora_layers().values():  # a faint shared expert: rank 8 is within tolerance
        with torch.no_grad():
            layer.lora_B_shared.mul_(1e-4)
    gates = {n: torch.full((4,), 0.25) for n in model.molora_layers()}
    rep = model.export_merged_adapter(tmp_path / "v", weights=gates, rank="auto", tolerance=1e-2, target="vllm")
    assert rep["auto"]["cat_rank"] == 4 * 2 + 2  # routed N*r + shared M*r
    assert rep["auto"]["rank"] == rep["max_lora_rank"] == _written_rank(tmp_path / "v") == 8
    assert rep["method"] == "svd"  # cat (rank 10) would be padded to 16


def test_a_shared_A_merges_exactly_at_rank_r(tmp_path):
    model = _random_adapter(num_experts=4, r=2, share_lora_A=True)
    gates = {n: torch.full((4,), 0.25) for n in model.molora_layers()}
    rep = model.export_merged_adapter(tmp_path / "p", weights=gates, rank="auto", tolerance=0.0)
    assert rep["auto"]["cat_rank"] == 2 and rep["method"] == "cat"
    assert rep["auto"]["rank"] == _written_rank(tmp_path / "p") == 2


def test_vllm_auto_caps_candidates_at_512(monkeypatch):
    """An exact rank of 600 (16 experts of r=64 on a wide layer: the SVD of such a layer is
    slow on CPU, so the spectra are given): candidates stop at 512, the error is one line."""
    import molora.merge.rank as rank

    model = _random_adapter(num_experts=4, r=2)
    layers = model.molora_layers()
    gates = {n: torch.full((4,), 0.25) for n in layers}
    spectrum = torch.linspace(1.0, 1e-3, 600, dtype=torch.float64)  # (600,) descending
    monkeypatch.setattr(rank, "_spectra", lambda layers, gates, task=None: {n: spectrum for n in layers})
    monkeypatch.setattr(rank, "cat_rank", lambda layer, gates: 16 * 64, raising=False)
    method, k, auto = rank.choose_rank(layers, gates, tolerance=0.5, target="vllm")
    assert (method, k) == ("svd", auto["rank"]) and auto["rank"] <= 512
    assert max(row["rank"] for row in auto["table"]) == 512
    assert auto["table"][-1]["max_rel_error"] > 0  # 512 of 600 is not exact
    with pytest.raises(ValueError, match=r"vLLM serves LoRA ranks up to 512.*exact rank is 600.*target='peft'"):
        rank.choose_rank(layers, gates, tolerance=1e-6, target="vllm")
