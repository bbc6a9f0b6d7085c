"""examples/quickstart.py runs, and reloads its adapter onto the same base weights."""

from __future__ import annotations

import runpy

from conftest import REPO_ROOT


def test_quickstart_reloads_onto_the_same_base(capsys):
    example = runpy.run_path(str(REPO_ROOT / "examples" / "quickstart.py"), run_name="quickstart")
    diff = example["main"](steps=4)
    assert diff == 0.0
    out = capsys.readouterr().out
    assert "max |logit difference| to the trained one 0.00e+00" in out and "task 1 continues" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("take-away: the reloaded adapter gives the trained model's logits exactly (max diff 0e+00)")
    assert "after 4 steps" in last


def _demo_results(accuracies: dict[str, float], export_ok: bool = True) -> dict:
    models = {name: {"mean_accuracy": acc} for name, acc in accuracies.items()}
    checks = {"sentiment": {"max_abs_logit_diff": 8.3e-7}, "topic": {"max_abs_logit_diff": 7.2e-7}}
    return {"models": models, "export_check": checks, "export_ok": export_ok}


def test_multitask_demo_takeaway_says_only_what_the_run_supports():
    demo = runpy.run_path(str(REPO_ROOT / "examples" / "multitask_demo.py"), run_name="example")
    close = demo["takeaway"](_demo_results({"molora-task": 0.642, "molora-topk": 0.631, "shared-lora": 0.650}))
    assert "reproduce the task router exactly (max |logit diff| 8.3e-07)" in close
    assert "does not rank them" in close and "shared-lora" not in close  # 0.019 apart: seed noise
    apart = demo["takeaway"](_demo_results({"molora-task": 0.70, "shared-lora": 0.64}, export_ok=False))
    assert "molora-task leads by 0.060" in apart and "do NOT reproduce" in apart
