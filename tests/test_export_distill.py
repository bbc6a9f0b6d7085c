"""method="distill": one plain LoRA trained to behave like the token-routed model (molora.merge.distill)."""

from __future__ import annotations

import json

import pytest
import torch
from test_export_vllm import _assert_vllm_folder, _fidelity_by_hand, _peft, _trained
from tiny_models import VOCAB

from molora import measure_gates
from molora.merge.distill import DistillConfig, distill_factors, factored_rel_error, kl_to_teacher
from molora.merge.factors import merge_layer

peft = pytest.importorskip("peft")


def _batches(n: int, *, seed: int, batch: int = 4, seq: int = 12, tasks: int = 2) -> list[dict]:
    """``n`` random causal-LM batches (one right-padded row each) with task ids, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                    "task_ids": torch.arange(batch) % tasks})
    return out


def _routed_topk(steps: int = 8):
    """A top-2 model trained enough that its token routing differs from any static merge."""
    model, fresh = _trained(router="topk", top_k=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for batch in _batches(steps, seed=5):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, fresh


def test_kl_to_teacher_is_zero_at_the_teacher_and_positive_elsewhere():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(kl_to_teacher(t, t, mask)) == pytest.approx(0.0, abs=1e-7)
    s = t.clone()
    s[0, 3:] += 10 * torch.randn(2, 11, generator=g)  # only padding changes: no KL
    assert float(kl_to_teacher(t, s, mask)) == pytest.approx(0.0, abs=1e-6)
    s[1, 0] += torch.randn(11, generator=g)
    by_hand = torch.nn.functional.kl_div(s[1, 0].log_softmax(-1), t[1, 0].log_softmax(-1), log_target=True, reduction="sum")
    assert float(kl_to_teacher(t, s, mask)) == pytest.approx(float(by_hand) / 8, rel=1e-5)


def test_factored_rel_error_matches_the_dense_difference():
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(4, 9, generator=g), torch.randn(7, 4, generator=g)
    a1, b1 = torch.randn(3, 9, generator=g), torch.randn(7, 3, generator=g)
    a0, b0, a1, b1 = (t.double() for t in (a0, b0, a1, b1))
    dense = torch.linalg.norm(b0 @ a0 - b1 @ a1) / torch.linalg.norm(b0 @ a0)
    assert factored_rel_error((a0, b0), (a1, b1)) == pytest.approx(float(dense), rel=1e-9)
    assert factored_rel_error((a0, b0), (a0, b0)) == pytest.approx(0.0, abs=1e-7)


def test_distill_export_beats_the_svd_static_merge_on_unseen_data_and_peft_agrees(tmp_path):
    model, fresh = _routed_topk()
    train, evals = _batches(24, seed=11), _batches(4, seed=99)  # eval batches are never distilled on
    gates = measure_gates(model, train)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = model.export_merged_adapter(
        tmp_path / "d", weights=gates, method="distill", rank=8, target="vllm",
        distill_batches=train, eval_batches=evals, distill_config=DistillConfig(steps=150, lr=3e-3),
    )  # fmt: skip
    static, distilled = rep["fidelity_static"], rep["fidelity"]
    assert static["mean_kl"] > 0
    assert distilled["mean_kl"] < static["mean_kl"] / 2  # the tiny.yaml study (RESULTS.md) gets ~1/25
    assert abs(distilled["loss_exported"] - distilled["loss_routed"]) < 0.05  # the bound on the eval loss
    d = rep["distill"]
    assert d["holdout_best"] < d["holdout_start"] and d["best_step"] > 0
    _assert_vllm_folder(tmp_path / "d", 8)
    # the written adapter is what PEFT runs, and the report measured exactly that
    again = _fidelity_by_hand(model, _peft(fresh, tmp_path / "d"), evals)
    for key, value in again.items():
        assert distilled[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    saved = json.loads((tmp_path / "d" / "merge_report.json").read_text())
    assert saved["method"] == "distill" and saved["fidelity_static"]["mean_kl"] == static["mean_kl"]
    # the teacher is untouched: distillation trains new factors only
    for n, p in model.named_parameters():
        assert torch.equal(p, base_before[n]), n


def test_distill_starts_at_the_svd_merge_and_never_returns_worse(tmp_path):
    model, _ = _routed_topk(steps=2)
    batches = _batches(4, seed=3)
    gates = measure_gates(model, batches)
    layers = model.molora_layers()
    start = {n: merge_layer(layer, gates[n], method="svd", rank=8) for n, layer in layers.items()}
    # lr so large that every step makes it worse: the SVD start is kept
    out, rep = distill_factors(model, start, batches, config=DistillConfig(steps=6, lr=10.0, eval_every=2, patience=2))
    assert rep["best_step"] == 0 and rep["holdout_best"] == rep["holdout_start"]
    for n, f in out.items():
        assert torch.equal(f.lora_A, start[n].lora_A) and torch.equal(f.lora_B, start[n].lora_B)


def test_distill_rows_the_svd_left_empty_can_learn():
    model, _ = _routed_topk(steps=2)
    batches = _batches(4, seed=3)
    gates = measure_gates(model, batches)
    layers = model.molora_layers()
    start = {n: merge_layer(layer, gates[n], method="svd", rank=16) for n, layer in layers.items()}  # exact rank 8
    assert all(f.lora_A[8:].abs().sum() == 0 for f in start.values())
    out, rep = distill_factors(model, start, batches, config=DistillConfig(steps=20, lr=3e-3, eval_every=5))
    assert rep["holdout_best"] < rep["holdout_start"]
    assert any(f.lora_B[:, 8:].abs().sum() > 0 for f in out.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": "auto", "distill_batches": []}, "int rank"),
        ({"rank": 8}, "distill_batches"),
        ({"rank": 0, "distill_batches": []}, "int >= 1"),
    ],
)
def test_distill_bad_arguments_are_named(tmp_path, kwargs, match):
    model, _ = _trained(router="topk", top_k=2)
    with pytest.raises(ValueError, match=match):
        model.export_merged_adapter(tmp_path / "x", weights="uniform", method="distill", **kwargs)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("lr", float("nan")), ("holdout", 1.0), ("patience", True)])
def test_distill_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        DistillConfig(**{field: value})


def test_cli_distill_export_of_a_topk_run_reports_svd_and_distilled(tmp_path, capsys):
    from conftest import TINY_CONFIG, tiny_run_overrides

    from molora.cli import main

    run = tmp_path / "run"
    extra = {"train.max_steps": 8, "train.export": False, "data.num_samples": 32}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 0
    capsys.readouterr()
    args = ["export", str(run), "--out", str(tmp_path / "e"), "--task", "all", "--weights", "measured",
            "--method", "distill", "--rank", "16", "--target", "vllm", "--distill-steps", "30",
            "--distill-batches", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reverse svd" in out and "reverse distill" in out and "held-out KL" in out
    for task in ("reverse", "sort"):
        rep = json.loads((tmp_path / "e" / task / "merge_report.json").read_text())
        assert rep["method"] == "distill" and rep["max_lora_rank"] == 16
        assert rep["fidelity"]["mean_kl"] <= rep["fidelity_static"]["mean_kl"] * 1.5  # held-out early stop, 30 steps
        assert rep["distill"]["holdout_best"] <= rep["distill"]["holdout_start"]
    # an adapter folder alone has no training data to distill on: a one-line error naming the flag
    no_run = [a if a != "measured" else "uniform" for a in args[2:]]
    assert main([*args[:1], str(run / "final"), *no_run]) == 2
    assert "--method distill" in capsys.readouterr().err
