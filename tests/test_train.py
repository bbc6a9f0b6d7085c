"""The training loop: tiny runs of `molora train`, resume, multi-process, eval and routing stats."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides
from tiny_models import tiny_llama

from molora.cli import main
from molora.core.recipes import ROUTER_LR_RATIO
from molora.training.optim import lr_factor
from molora.training.tokenizer import build_byte_tokenizer

MAX_STEPS = 6


def _overrides(root: Path, out: str, extra: dict | None = None) -> list[str]:
    # 16 samples = 4 batches per pass: runs and resumes cross epoch boundaries
    return tiny_run_overrides(
        root, out, {"train.max_steps": MAX_STEPS, "data.num_samples": 16, "train.grad_accum": 2, **(extra or {})}
    )


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One uninterrupted 6-step run of configs/tiny.yaml (checkpoint at step 3)."""
    root = tmp_path_factory.mktemp("train")
    assert main(["train", str(TINY_CONFIG), *_overrides(root, "full")]) == 0
    return root / "full"


def test_tiny_run_writes_checkpoints_final_adapter_and_metrics(tiny_run):
    assert (tiny_run / "run_config.yaml").is_file()
    ckpt = tiny_run / "checkpoints" / "step_0000003"
    for name in (
        "adapter/molora_config.json",
        "adapter/molora_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_rank0.pt",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["micro_step"] == 6  # epoch 1, 2 batches in: resume skips them
    # the last step is checkpointed too (resumable with a higher max_steps); no temporary folder is left
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert (tiny_run / "final" / "molora_model.safetensors").is_file()
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["tasks"] == ["reverse", "sort"]
    # top-k router: per-task adapters from gates measured on each task's eval data
    assert summary["export"] == str(tiny_run / "export")
    assert all((tiny_run / "export" / task / "adapter_config.json").is_file() for task in ("reverse", "sort"))
    train = _records(tiny_run, "train")
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in train)
    # LoRA+ and the router learning rate: separate groups; the router at its kind's default ratio
    r = train[-1]
    assert r["lr_lora_B"] == pytest.approx(4 * r["lr_base"])
    assert r["lr_router"] == pytest.approx(ROUTER_LR_RATIO["topk"] * r["lr_base"])
    health = _records(tiny_run, "routing_health")
    assert [h["step"] for h in health] == list(range(1, MAX_STEPS + 1))
    assert {"entropy", "max_gate", "usage_cv", "dead_experts"} <= set(health[-1]["summary"])


def test_eval_reports_per_task_loss_accuracy_and_routing(tiny_run):
    evals = _records(tiny_run, "eval")
    assert [e["step"] for e in evals] == [3, 6]
    last = evals[-1]
    assert set(last["tasks"]) == {"reverse", "sort"}
    for m in last["tasks"].values():
        assert m["examples"] == 8  # max_eval_batches=2 x batch 4
        assert m["tokens"] > 0 and math.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1
    assert set(last["routing"]) == {"reverse", "sort"}
    layers = last["routing"]["sort"]
    assert len(layers) == 2 * 7  # 2 decoder layers x 7 projections
    for stats in layers.values():
        assert len(stats["load"]) == 4 and stats["tokens"] > 0
        assert sum(stats["load"]) == pytest.approx(2.0)  # top-2: every token picks 2 experts
        assert sum(stats["gates"]) == pytest.approx(1.0, abs=1e-5)
    # routing is measured per task: the two tasks saw different tokens
    a, b = last["routing"]["reverse"], last["routing"]["sort"]
    assert any(a[k]["load"] != b[k]["load"] for k in a)


def test_final_adapter_loads_back(tiny_run):
    from molora import MoLoRAModel

    base = tiny_llama(vocab_size=260, max_position_embeddings=64)
    model = MoLoRAModel.from_pretrained(base, tiny_run / "final")
    assert model.molora_config.task_names == ["reverse", "sort"]
    assert any(float(layer.lora_B.detach().abs().sum()) > 0 for layer in model.molora_layers().values())


def test_resume_continues_with_the_same_losses(tiny_run, tmp_path):
    # Interrupted after the step-3 checkpoint: the copy loses everything written later.
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")  # the last step's checkpoint
    (resumed / "summary.json").unlink()
    extra = {"train.output_dir": str(resumed), "data.cache_dir": str(tiny_run.parent / "ds_cache")}
    assert main(["train", str(TINY_CONFIG), "--resume", *_overrides(tmp_path, "unused", extra)]) == 0
    full = {r["step"]: r["loss"] for r in _records(tiny_run, "train")}
    again = _records(resumed, "train")
    assert [r["step"] for r in again] == list(range(1, MAX_STEPS + 1))  # steps 4.. logged once
    for r in again:
        assert r["loss"] == pytest.approx(full[r["step"]], abs=1e-6), r["step"]
    evals = {e["step"]: e for e in _records(tiny_run, "eval")}
    for e in _records(resumed, "eval"):
        for task, m in e["tasks"].items():
            assert m["loss"] == pytest.approx(evals[e["step"]]["tasks"][task]["loss"], abs=1e-6)


def test_resume_without_a_checkpoint_fails_clearly(tmp_path, capsys):
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "empty"), "--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "empty"), "--resume-from", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_fresh_run_refuses_a_folder_holding_an_earlier_run(tiny_run, tmp_path, capsys):
    extra = {"train.output_dir": str(tiny_run)}
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "unused", extra)]) == 2
    assert re.search(r"earlier run .*--resume.*overwrite_output_dir=true", capsys.readouterr().err)
    assert (tiny_run / "checkpoints" / "step_0000003").is_dir()


def test_task_router_run_exports_per_task_adapters(tmp_path):
    run = tmp_path / "task"
    (run / "checkpoints" / "step_0000009").mkdir(parents=True)  # an earlier run, cleared by overwrite_output_dir
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 9, "loss": 1.0}\n')
    extra = {
        "molora.router": "task",
        "molora.num_tasks": 2,
        "molora.top_k": "null",
        "train.max_steps": 2,
        "train.save_every": 0,
        "train.eval_every": 0,
    }
    extra["train.overwrite_output_dir"] = "true"
    extra["model.gradient_checkpointing"] = "true"
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "task", extra)]) == 0
    assert [r["step"] for r in _records(run, "train")] == [1, 2]
    from safetensors.torch import load_file

    trained = load_file(run / "final" / "molora_model.safetensors")
    assert all(float(v.abs().sum()) > 0 for k, v in trained.items() if k.endswith("lora_B"))  # every expert set learned
    evals = _records(run, "eval")
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert not (run / "checkpoints").exists()
    for task in ("reverse", "sort"):
        assert (run / "export" / task / "adapter_config.json").is_file()


def test_sequence_classification_run(tmp_path):
    for task, key in (("vowels", "aeiou"), ("digits", "0123456789")):
        for split in ("train", "eval"):
            rows = []
            for i in range(12):
                text = ("x" * (i % 5)) + (key[i % len(key)] if i % 2 else "z")
                rows.append(json.dumps({"text": text, "label": i % 2}))
            (tmp_path / f"{task}_{split}.jsonl").write_text("\n".join(rows) + "\n")
    extra = {
        "model.task_type": "sequence_classification",
        "model.num_labels": 2,
        "molora.modules_to_save": "[score]",
        "data.tasks": "null",
        "data.tasks.vowels.train": str(tmp_path / "vowels_train.jsonl"),
        "data.tasks.vowels.eval": str(tmp_path / "vowels_eval.jsonl"),
        "data.tasks.digits.train": str(tmp_path / "digits_train.jsonl"),
        "data.tasks.digits.eval": str(tmp_path / "digits_eval.jsonl"),
        "train.max_steps": 2,
        "train.save_every": 0,
        "train.eval_every": 0,
        "train.export": "false",
    }
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "cls", extra)]) == 0
    (last,) = _records(tmp_path / "cls", "eval")
    for task in ("vowels", "digits"):
        m = last["tasks"][task]
        assert m["examples"] == 8 and m["tokens"] == 8 and 0 <= m["accuracy"] <= 1


def test_run_from_a_saved_model_folder(tmp_path):
    """model.name_or_path: a transformers folder with its tokenizer (here: saved tiny ones)."""
    folder = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=260, max_position_embeddings=64, initializer_range=0.2).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    extra = {
        "model.from_config": "null",
        "model.tokenizer": "null",
        "model.name_or_path": str(folder),
        "model.dtype": "float32",
        "train.max_steps": 1,
        "train.save_every": 0,
        "train.eval_every": 0,
        "train.export": "false",
    }
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "saved", extra)]) == 0
    meta = json.loads((tmp_path / "saved" / "final" / "molora_config.json").read_text())
    assert meta["config"]["task_names"] == ["reverse", "sort"]


def test_bf16_mixed_precision_on_cpu(tmp_path):
    extra = {
        "train.mixed_precision": "bf16",
        "train.max_steps": 2,
        "train.save_every": 0,
        "train.eval_every": 0,
        "train.export": "false",
    }
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "bf16", extra)]) == 0
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and math.isfinite(summary["final_train_loss"])
    assert all(math.isfinite(m["loss"]) for m in summary["final_eval"].values())


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def test_lr_factor_warmup_then_cosine():
    f = lambda s: lr_factor(s, warmup_steps=4, max_steps=14, schedule="cosine", min_lr_ratio=0.1)  # noqa: E731
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert lr_factor(7, warmup_steps=0, max_steps=10, schedule="constant", min_lr_ratio=0.0) == 1.0
    assert lr_factor(5, warmup_steps=0, max_steps=10, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.5)


def test_param_groups_split_routers_and_b():
    from molora import MoLoRAConfig, get_molora_model, get_optimizer_param_groups

    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2))
    groups = get_optimizer_param_groups(model, 1e-3, router_lr=5e-3, loraplus_lr_ratio=8, weight_decay=0.1)
    groups = {g["name"]: g for g in groups}
    assert set(groups) == {"base", "lora_B", "router"}
    assert groups["lora_B"]["lr"] == pytest.approx(8e-3) and groups["router"]["lr"] == pytest.approx(5e-3)
    assert groups["router"]["weight_decay"] == 0.0 and groups["base"]["weight_decay"] == 0.1
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == model.get_nb_trainable_parameters()[0]
    assert all(p.dim() == 3 for p in groups["lora_B"]["params"])  # (N, out, r)


def test_byte_tokenizer_round_trip():
    tok = build_byte_tokenizer()
    ids = tok("héllo, world")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and max(ids) < 259 and len(tok) == 259
    assert tok.decode(ids, skip_special_tokens=True) == "héllo, world"
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert torch.tensor(ids).dtype == torch.long


# --------------------------------------------------------------------------------------
# molora inspect
# --------------------------------------------------------------------------------------


def test_inspect_prints_summary_and_writes_plots(tiny_run, capsys):
    pytest.importorskip("matplotlib")
    for name in ("routing.png", "metrics.png"):
        (tiny_run / name).unlink(missing_ok=True)
    assert main(["inspect", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "eval at step 6" in out and "reverse" in out and "sort" in out and "gate entropy" in out
    for name in ("routing.png", "metrics.png"):
        assert (tiny_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(tiny_run), "--step", "3", "--no-plots"]) == 0
    assert "eval at step 3" in capsys.readouterr().out
    assert main(["inspect", str(tiny_run), "--step", "4"]) == 2


def test_inspect_without_matplotlib_says_how_to_install(tiny_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["inspect", str(tiny_run)]) == 0
    captured = capsys.readouterr()
    assert "eval at step 6" in captured.out
    assert "matplotlib is not installed" in captured.err and "molora[plot]" in captured.err


def test_inspect_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "metrics.jsonl is missing" in capsys.readouterr().err


def test_eval_token_loss_and_accuracy_match_a_direct_computation():
    from molora.training.evaluation import _example_stats

    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(3, 128, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, 7:] = -100  # padding
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    loss_sum, count, correct = _example_stats(out.logits, labels, causal=True)
    assert count.tolist() == [5, 5, 3]
    assert (loss_sum.sum() / count.sum()).item() == pytest.approx(out.loss.item(), rel=1e-5)  # HF's mean token loss
    pred = out.logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    assert correct.sum().item() == ((pred == target) & (target != -100)).sum().item()
    cls_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss, n, ok = _example_stats(cls_logits, torch.tensor([0, 0]), causal=False)
    assert n.tolist() == [1, 1] and ok.tolist() == [1, 0]
    assert loss.tolist() == pytest.approx(
        torch.nn.functional.cross_entropy(cls_logits, torch.tensor([0, 0]), reduction="none").tolist()
    )


def test_run_from_config_keeps_its_base_model_for_exports(tiny_run, tmp_path):
    """A base built from config exists nowhere else: the run saves it and the adapter names it,
    so that `molora export RUN` needs no --base."""
    import json

    from molora import MoLoRAModel
    from molora.apps.commands.export import load_base_model
    from molora.cli import main

    meta = json.loads((tiny_run / "final" / "molora_config.json").read_text())
    assert meta["base_model_name_or_path"] == str((tiny_run / "base_model").resolve())
    model = MoLoRAModel.from_pretrained(load_base_model(meta["base_model_name_or_path"]), tiny_run / "final")
    assert model.base_model.config.vocab_size == 260
    assert (
        main(
            ["export", str(tiny_run), "--out", str(tmp_path / "r4"), "--method", "svd", "--rank", "4", "--no-progress"]
        )
        == 0
    )
    assert (tmp_path / "r4" / "adapter_model.safetensors").is_file()
