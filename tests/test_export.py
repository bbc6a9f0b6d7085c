"""Tests for molora.merge.export: the merge math, PEFT adapter export, merge_and_unload, gates."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from molora.merge.export import (
    cat_factors,
    dense_delta,
    load_gates,
    merge_factors,
    save_gates,
    svd_factors,
)


def _factors(n=4, r=3, d_in=11, d_out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(n, r, d_in, generator=g)  # (N, r, in)
    lora_B = torch.randn(n, d_out, r, generator=g)  # (N, out, r)
    return lora_A, lora_B


# --------------------------------------------------------------------------- pure math


def test_dense_delta_matches_loop():
    lora_A, lora_B = _factors()
    w = torch.tensor([0.1, 0.0, 0.5, 0.4])
    ref = sum(0.7 * w[i] * lora_B[i] @ lora_A[i] for i in range(4))
    torch.testing.assert_close(dense_delta(lora_A, lora_B, w, 0.7), ref)


def test_cat_is_exact_and_drops_zero_experts():
    lora_A, lora_B = _factors()
    w = torch.tensor([0.1, 0.0, 0.5, 0.0])
    f = cat_factors(lora_A, lora_B, w, 2.0)
    assert f.lora_A.shape == (2 * 3, 11) and f.lora_B.shape == (7, 2 * 3)
    assert f.rel_error == 0.0
    torch.testing.assert_close(f.lora_B @ f.lora_A, dense_delta(lora_A, lora_B, w, 2.0))
    empty = cat_factors(lora_A, lora_B, torch.zeros(4), 2.0)
    assert empty.lora_A.shape == (0, 11) and empty.lora_B.shape == (7, 0)


def test_svd_full_rank_is_exact():
    lora_A, lora_B = _factors()
    w = torch.tensor([0.25, 0.25, 0.25, 0.25])
    f = svd_factors(lora_A, lora_B, w, 0.5, rank=7)  # rank(dW) <= min(out=7, N r=12)
    torch.testing.assert_close(f.lora_B @ f.lora_A, dense_delta(lora_A, lora_B, w, 0.5), atol=1e-5, rtol=1e-5)
    assert f.rel_error < 1e-6


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("shape", [(4, 3, 11, 7), (3, 2, 5, 13)])
def test_svd_truncation_is_optimal_and_error_matches(rank, shape):
    n, r, d_in, d_out = shape
    lora_A, lora_B = _factors(n, r, d_in, d_out, seed=rank)
    w = torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(1)), 0)
    delta = dense_delta(lora_A, lora_B, w, 1.3).double()  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young optimum
    f = svd_factors(lora_A, lora_B, w, 1.3, rank=rank)
    assert f.lora_A.shape == (rank, d_in) and f.lora_B.shape == (d_out, rank)
    torch.testing.assert_close((f.lora_B @ f.lora_A).double(), best, atol=1e-5, rtol=1e-4)
    expected_error = float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta))
    assert f.rel_error == pytest.approx(expected_error, rel=1e-5, abs=1e-7)


def test_svd_pads_to_requested_rank():
    lora_A, lora_B = _factors(n=2, r=2, d_in=9, d_out=8)
    w = torch.tensor([1.0, 0.0])  # dW has rank 2
    f = svd_factors(lora_A, lora_B, w, 1.0, rank=5)
    assert f.lora_A.shape == (5, 9) and f.lora_B.shape == (8, 5)
    torch.testing.assert_close(f.lora_B @ f.lora_A, dense_delta(lora_A, lora_B, w, 1.0), atol=1e-5, rtol=1e-5)
    zero = svd_factors(lora_A, lora_B, torch.zeros(2), 1.0, rank=3)
    assert zero.rel_error == 0.0 and not zero.lora_B.any()


def test_merge_factors_errors():
    lora_A, lora_B = _factors()
    w = torch.full((4,), 0.25)
    with pytest.raises(ValueError, match="`method` must be one of"):
        merge_factors(lora_A, lora_B, w, 1.0, method="ties")
    with pytest.raises(ValueError, match="`rank` applies to method='svd'"):
        merge_factors(lora_A, lora_B, w, 1.0, method="cat", rank=4)
    with pytest.raises(ValueError, match="`rank` must be an int >= 1"):
        merge_factors(lora_A, lora_B, w, 1.0, method="svd", rank=0)
    with pytest.raises(ValueError, match=r"`weights` must have shape \(N,\)"):
        merge_factors(lora_A, lora_B, torch.ones(3), 1.0)
    assert merge_factors(lora_A, lora_B, w, 1.0, method="svd").lora_A.shape == (3, 11)  # default r


def test_gates_file_round_trip(tmp_path):
    gates = {"a.q": torch.tensor([0.25, 0.75]), "a.v": torch.tensor([1.0, 0.0])}
    save_gates(gates, tmp_path / "g.json")
    back = load_gates(tmp_path / "g.json")
    assert set(back) == set(gates) and all(torch.equal(back[k], gates[k]) for k in gates)
    by_task = {0: gates, 1: {k: v.flip(0) for k, v in gates.items()}}
    save_gates(by_task, tmp_path / "t.json")
    back = load_gates(tmp_path / "t.json")
    assert set(back) == {0, 1} and torch.equal(back[1]["a.q"], by_task[1]["a.q"])


# --------------------------------------------------------------------------- model-level

from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402

from molora import MoLoRAConfig, MoLoRALinear, get_molora_model, measure_gates  # noqa: E402

VOCAB = 128


def _llama():
    return tiny_llama().train()


def _gpt2():
    return tiny_gpt2(bos_token_id=0, eos_token_id=0).train()


BASES = {
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_fc"]),  # Conv1D: weight stored (in, out)
}


def _inputs(batch=2, seq=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _trained(kind: str, **cfg_kw):
    """(MoLoRA model after one AdamW step on random data, untouched copy of its base)."""
    make, targets = BASES[kind]
    base = make()
    fresh = copy.deepcopy(base)
    cfg = MoLoRAConfig(**{"target_modules": targets, "num_experts": 4, "r": 2, "lora_alpha": 8, **cfg_kw})
    model = get_molora_model(base, cfg)
    ids = _inputs(seed=7)
    task_ids = torch.tensor([0, 1]) if cfg.router == "task" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids, task_ids=task_ids).loss.backward()
    opt.step()
    model.eval()
    assert any(l.lora_B.abs().sum() > 0 for l in model.molora_layers().values())  # B left zero
    return model, fresh


def _dense_reference(model, fresh, gates):
    """The base with W0 + s * sum_i w_i B_i A_i folded in, computed by an explicit loop."""
    ref = copy.deepcopy(fresh)
    with torch.no_grad():
        for name, layer in model.molora_layers().items():
            w = gates[name]
            delta = sum(layer.scaling * w[i] * layer.lora_B[i] @ layer.lora_A[i] for i in range(layer.num_experts))
            weight = ref.get_submodule(name).weight
            weight += delta.T if layer.fan_in_fan_out else delta
    return ref.eval()


def _load_peft(fresh, path):
    """PeftModel on a copy of the base; asserts the file and PEFT's modules have the same keys."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), str(path))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    saved = set(load_file(str(path / "adapter_model.safetensors")))
    assert set(get_peft_model_state_dict(peft_model)) == saved  # no missing, no unexpected keys
    return peft_model.eval()


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cat_export_matches_dense_reference(kind, tmp_path):
    model, fresh = _trained(kind, router="topk", top_k=2, use_rslora=(kind == "llama"))
    layers = model.molora_layers()
    g = torch.Generator().manual_seed(3)
    gates = {}
    for j, name in enumerate(layers):  # zeros on some layers: ranks differ -> rank_pattern
        w = torch.rand(4, generator=g)
        w[: j % 3] = 0.0
        gates[name] = w
    report = model.export_merged_adapter(tmp_path / "a", weights=gates, method="cat")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"] and cfg["rank_pattern"]
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    assert all(report["layers"][n]["rank"] == 2 * int((gates[n] != 0).sum()) for n in layers)
    assert json.loads((tmp_path / "a" / "merge_report.json").read_text())["layers"].keys() == layers.keys()
    ids = _inputs()
    expected = _logits(_dense_reference(model, fresh, gates), ids)
    peft_model = _load_peft(fresh, tmp_path / "a")
    torch.testing.assert_close(_logits(peft_model, ids), expected, atol=1e-5, rtol=1e-4)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-4)


def test_modules_to_save_are_exported(tmp_path):
    from transformers import LlamaForSequenceClassification

    base = tiny_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0).train()
    fresh = copy.deepcopy(base)
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router="soft", modules_to_save=["score"]
    )
    model = get_molora_model(base, cfg)
    ids = _inputs()
    loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    model.export_merged_adapter(tmp_path / "cls", weights="uniform")
    assert json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    ref = _dense_reference(model, fresh, {n: torch.full((2,), 0.5) for n in model.molora_layers()})
    ref.score.load_state_dict(base.score.state_dict())
    assert not torch.equal(ref.score.weight, fresh.score.weight)  # the head did train
    got = _logits(_load_peft(fresh, tmp_path / "cls"), ids)
    torch.testing.assert_close(got, _logits(ref, ids), atol=1e-5, rtol=1e-4)


def test_uniform_and_tensor_weights_and_zero_layer(tmp_path):
    model, fresh = _trained("llama", router="soft")
    ids = _inputs()
    uniform = {n: torch.full((4,), 0.25) for n in model.molora_layers()}
    model.export_merged_adapter(tmp_path / "u", weights="uniform")
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "u"), ids),
        _logits(_dense_reference(model, fresh, uniform), ids), atol=1e-5, rtol=1e-4,
    )
    gates = {n: torch.tensor([0.0, 0.7, 0.0, 0.3]) for n in model.molora_layers()}
    first = next(iter(gates))
    gates[first] = torch.zeros(4)  # dW = 0 there: the module is left out of the adapter
    report = model.export_merged_adapter(tmp_path / "z", weights=gates)
    assert report["layers"][first]["rank"] == 0
    keys = load_file(str(tmp_path / "z" / "adapter_model.safetensors"))
    assert not any(k.startswith(f"base_model.model.{first}.") for k in keys)
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "z"), ids),
        _logits(_dense_reference(model, fresh, gates), ids), atol=1e-5, rtol=1e-4,
    )
    # one (N,) tensor for every layer, written over the previous export
    model.export_merged_adapter(tmp_path / "z", weights=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    same = {n: torch.tensor([0.1, 0.2, 0.3, 0.4]) for n in model.molora_layers()}
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "z"), ids),
        _logits(_dense_reference(model, fresh, same), ids), atol=1e-5, rtol=1e-4,
    )


def test_task_router_export_all_tasks(tmp_path):
    model, fresh = _trained("llama", router="task", num_tasks=3, top_k=2, task_names=["sum", "copy", "rev"])
    reports = model.export_merged_adapter(tmp_path / "tasks", task="all")
    assert set(reports) == {"sum", "copy", "rev"}
    ids = _inputs()
    for t, name in enumerate(["sum", "copy", "rev"]):
        assert (tmp_path / "tasks" / name / "adapter_config.json").is_file()
        expected = _logits(model, ids, task_ids=torch.full((2,), t))
        got = _logits(_load_peft(fresh, tmp_path / "tasks" / name), ids)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    single = model.export_merged_adapter(tmp_path / "one", task="copy")
    assert single["layers"] == reports["copy"]["layers"]


def test_svd_full_rank_exact_and_truncation_optimal(tmp_path):
    model, fresh = _trained("gpt2", router="soft")
    gates = {n: torch.tensor([0.4, 0.3, 0.2, 0.1]) for n in model.molora_layers()}
    ids = _inputs()
    model.export_merged_adapter(tmp_path / "full", weights=gates, method="svd", rank=8)  # N r = 8
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "full"), ids),
        _logits(_dense_reference(model, fresh, gates), ids), atol=1e-4, rtol=1e-4,
    )
    report = model.export_merged_adapter(tmp_path / "low", weights=gates, method="svd", rank=3)
    saved = load_file(str(tmp_path / "low" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["r"] == 3
    for name, layer in model.molora_layers().items():
        delta = dense_delta(layer.lora_A.detach(), layer.lora_B.detach(), gates[name], layer.scaling).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        prefix = f"base_model.model.{name}"
        got = saved[f"{prefix}.lora_B.weight"].double() @ saved[f"{prefix}.lora_A.weight"].double()
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
        err = float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta))
        assert report["layers"][name]["rel_error"] == pytest.approx(err, rel=1e-4, abs=1e-6)
    _load_peft(fresh, tmp_path / "low")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_returns_plain_model(kind):
    model, fresh = _trained(kind, router="task", num_tasks=2)
    ids = _inputs()
    expected = _logits(model, ids, task_ids=torch.tensor([1, 1]))
    merged = model.merge_and_unload(task=1)
    assert type(merged) is type(fresh)
    assert not any(isinstance(m, MoLoRALinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-4)


def _router_gates(model, batches, by_task):
    """Independent reference: recompute every router on the captured layer inputs."""
    inputs = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, n=name: inputs.__setitem__(n, args[0]))
        for name, layer in model.molora_layers().items()
    ]
    sums = {}
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].reshape(-1).bool()
            tasks = batch["task_ids"].repeat_interleave(batch["input_ids"].shape[1])
            for name, layer in model.molora_layers().items():
                x = inputs[name].reshape(-1, layer.in_features)
                w = layer.router(x, None).weights
                for t in (tasks.unique().tolist() if by_task else [None]):
                    sel = mask & (tasks == t) if by_task else mask
                    acc = sums.setdefault(t, {}).setdefault(name, [0, 0])
                    acc[0] = acc[0] + w[sel].sum(0)
                    acc[1] += int(sel.sum())
    for h in hooks:
        h.remove()
    out = {t: {n: s / c for n, (s, c) in g.items()} for t, g in sums.items()}
    return out if by_task else out[None]


def test_measure_gates_ignores_padding_and_groups_by_task(tmp_path):
    model, fresh = _trained("llama", router="topk", top_k=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    batches = [
        {"input_ids": _inputs(seed=s), "attention_mask": mask, "task_ids": torch.tensor([s % 2, 1])}
        for s in range(3)
    ]
    gates = measure_gates(model, batches)
    ref = _router_gates(model, batches, by_task=False)
    for name in model.molora_layers():
        torch.testing.assert_close(gates[name], ref[name], atol=1e-6, rtol=1e-5)
        assert gates[name].sum() == pytest.approx(1.0, abs=1e-5)
    by_task = measure_gates(model, batches, by_task=True)
    ref = _router_gates(model, batches, by_task=True)
    assert set(by_task) == {0, 1}
    for t in (0, 1):
        for name in model.molora_layers():
            torch.testing.assert_close(by_task[t][name], ref[t][name], atol=1e-6, rtol=1e-5)
    # by-task measured gates export per task; equal to the dense reference of that task
    reports = model.export_merged_adapter(tmp_path / "m", weights=by_task, task="all")
    assert set(reports) == {"task_0", "task_1"}
    ids = _inputs()
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "m" / "task_1"), ids),
        _logits(_dense_reference(model, fresh, by_task[1]), ids), atol=1e-5, rtol=1e-4,
    )


def test_export_errors(tmp_path):
    model, _ = _trained("llama", router="soft")
    with pytest.raises(ValueError, match="needs the task router"):
        model.export_merged_adapter(tmp_path / "x", task=0)
    with pytest.raises(ValueError, match="`method` must be one of"):
        model.export_merged_adapter(tmp_path / "x", method="ties")
    with pytest.raises(ValueError, match="missing"):
        model.export_merged_adapter(tmp_path / "x", weights={"model.layers.0.self_attn.q_proj": torch.ones(4)})
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        model.export_merged_adapter(tmp_path / "x", weights=torch.ones(3))
    with pytest.raises(ValueError, match="all zero"):
        model.export_merged_adapter(tmp_path / "x", weights=torch.zeros(4))
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*"))  # failures leave nothing
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous molora export"):
        model.export_merged_adapter(tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- CLI


def test_cli_export_adapter_tasks_and_merged_base(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from molora.cli import main

    base_dir = tmp_path / "base"
    _llama().save_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    fresh = copy.deepcopy(base)
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, r=2, lora_alpha=8, router="task", num_tasks=2
    )
    model = get_molora_model(base, cfg)
    ids = _inputs(seed=7)
    model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1])).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    model.save_pretrained(tmp_path / "run" / "final")
    ids = _inputs()

    out_all = str(tmp_path / "all")
    assert main(["export", str(tmp_path / "run"), "--out", out_all, "--task", "all", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "rel. error" in table and "model.layers.1.self_attn.v_proj" in table
    for t in (0, 1):
        torch.testing.assert_close(
            _logits(_load_peft(fresh, tmp_path / "all" / f"task_{t}"), ids),
            _logits(model, ids, task_ids=torch.tensor([t, t])), atol=1e-5, rtol=1e-4,
        )

    gates = {n: torch.tensor([0.5, 0.5, 0.0, 0.0]) for n in model.molora_layers()}
    save_gates(gates, tmp_path / "run" / "gates.json")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "svd"), "--weights", "measured",
                 "--method", "svd", "--rank", "4", "--no-progress"]) == 0  # rank(dW) <= 2 r = 4: exact
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "svd"), ids),
        _logits(_dense_reference(model, fresh, gates), ids), atol=1e-5, rtol=1e-4,
    )

    # measured gates from the training loop's metrics.jsonl (last eval record, per task)
    (tmp_path / "run" / "gates.json").unlink()
    layers = list(model.molora_layers())
    per_task = {
        "sum": {n: {"load": [1, 1, 0, 0], "gates": [0.6, 0.4, 0.0, 0.0], "tokens": 30} for n in layers},
        "copy": {n: {"load": [0, 0, 1, 1], "gates": [0.0, 0.0, 0.2, 0.8], "tokens": 10} for n in layers},
    }
    records = [{"type": "train", "step": 1, "loss": 1.0}, {"type": "eval", "step": 1, "routing": per_task}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out_m = str(tmp_path / "measured")
    assert main(["export", str(tmp_path / "run"), "--out", out_m, "--weights", "measured", "--task", "all",
                 "--no-progress"]) == 0
    copy_gates = {n: torch.tensor([0.0, 0.0, 0.2, 0.8]) for n in layers}
    torch.testing.assert_close(
        _logits(_load_peft(fresh, tmp_path / "measured" / "copy"), ids),
        _logits(_dense_reference(model, fresh, copy_gates), ids), atol=1e-5, rtol=1e-4,
    )
    assert main(["export", str(tmp_path / "run"), "--out", out_m, "--weights", "measured", "--no-progress"]) == 0
    pooled = json.loads((tmp_path / "measured" / "merge_report.json").read_text())["layers"][layers[0]]["weights"]
    assert pooled == pytest.approx([0.45, 0.3, 0.05, 0.2])  # token-weighted over tasks (30 : 10)

    assert main(["export", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "merged"), "--task", "1",
                 "--merge-into-base", "--no-progress"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids, task_ids=torch.tensor([1, 1])),
                               atol=1e-5, rtol=1e-4)

    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--weights", "bogus"]) == 2


def test_cli_finds_the_adapter_of_a_run(tmp_path):
    from molora.apps.commands.export import find_adapter_dir

    for step in (10, 200, 30):
        sub = f"checkpoints/step_{step:07d}/adapter"
        (tmp_path / "run" / sub).mkdir(parents=True)
        (tmp_path / "run" / sub / "molora_config.json").write_text("{}")
    assert find_adapter_dir(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step_0000200" / "adapter"
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / "molora_config.json").write_text("{}")
    assert find_adapter_dir(tmp_path / "run") == tmp_path / "run" / "final"
    assert find_adapter_dir(tmp_path / "run" / "final") == tmp_path / "run" / "final"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MoLoRA adapter"):
        find_adapter_dir(tmp_path / "empty")


@pytest.mark.gpu
def test_export_and_merge_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, fresh = _trained("llama", router="task", num_tasks=2)
    model.cuda()
    ids = _inputs().cuda()
    expected = _logits(model, ids, task_ids=torch.tensor([1, 1], device="cuda"))
    model.export_merged_adapter(tmp_path / "a", task=1, method="svd", rank=8)  # rank(dW) <= N r = 8: exact
    peft_model = _load_peft(fresh, tmp_path / "a").cuda()
    torch.testing.assert_close(_logits(peft_model, ids), expected, atol=1e-4, rtol=1e-4)
    merged = model.merge_and_unload(task=1)
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)


def test_svd_rank_above_every_exact_rank_is_refused(tmp_path):
    """rank=2,000,000 used to write a 1.7 GB zero-padded adapter."""
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="soft"))
    with pytest.raises(ValueError, match=r"`rank`=2000000 is above the largest exact rank of any layer \(4 = "):
        model.export_merged_adapter(tmp_path / "x", method="svd", rank=2_000_000)
    assert not (tmp_path / "x").exists()
    model.export_merged_adapter(tmp_path / "ok", method="svd", rank=4)  # the exact rank itself is allowed
