"""--resume with changed settings, damaged or foreign state, and runs that diverge: the current
config's learning rates and schedule apply (only the moments and the step are restored), a
finished run resumes into its final files, a missing RNG file warns, impossible counters and
optimizer state of other shapes are refused, and the first non-finite loss or gradient stops the
run before anything NaN is written."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides
from safetensors.torch import load_file
from tampering import CKPT, edit_trainer_state, foreign_optimizer

from molora.cli import main
from molora.training.metrics import MetricsLog, read_metrics
from molora.training.optim import lr_factor

BASE = {
    "train.max_steps": 2,
    "train.save_every": 2,
    "train.eval_every": 0,
    "train.warmup": 0,
    "train.export": "true",
    "data.num_samples": 16,
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run (warm-up 0, cosine to 0: its last lr is 0)."""
    root = tmp_path_factory.mktemp("resume")
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(root, "run", BASE)]) == 0
    return root


def _resume(root: Path, tmp_path: Path, damage=None, **extra) -> tuple[list[str], Path]:
    run = tmp_path / "r"
    shutil.copytree(root / "run", run)
    if damage:
        damage(run)
    values = {**BASE, "train.output_dir": str(run), "data.cache_dir": str(root / "ds_cache"), **extra}
    return ["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "unused", values), "--resume"], run


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1].split("\r")[-1]


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]


def test_resume_takes_lr_and_schedule_from_the_current_config(finished, tmp_path, capsys):
    lr, router_lr, ratio = 1e-3, 3e-3, 2
    args, run = _resume(
        finished, tmp_path, **{"train.max_steps": 4, "train.lr": lr, "train.router_lr": router_lr, "train.loraplus_lr_ratio": ratio}
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train.lr: 0.005 -> 0.001" in out and "train.max_steps: 2 -> 4" in out and "train.router_lr: None -> 0.003" in out
    records = {r["step"]: r for r in _train_records(run)}
    assert sorted(records) == [1, 2, 3, 4]
    for step in (3, 4):  # optimizer step index step - 1 of the new 4-step cosine
        factor = lr_factor(step - 1, warmup_steps=0, max_steps=4, schedule="cosine", min_lr_ratio=0.0)
        assert records[step]["lr_base"] == pytest.approx(lr * factor)
        assert records[step]["lr_lora_B"] == pytest.approx(ratio * lr * factor)
        assert records[step]["lr_router"] == pytest.approx(router_lr * factor)
    assert records[3]["lr_base"] > records[4]["lr_base"] > 0  # decays on: no lr 0, no rising schedule


def test_resume_of_a_finished_run_writes_its_final_files(finished, tmp_path):
    """Killed after its last checkpoint: final/, export/ and summary.json are missing."""

    def kill_after_checkpoint(run):
        for name in ("final", "export", "summary.json"):
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    args, run = _resume(finished, tmp_path, kill_after_checkpoint)
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_train_loss"] is not None
    assert (run / "final" / "molora_model.safetensors").is_file()
    assert any((run / "export").iterdir())
    assert [r["step"] for r in _train_records(run)] == [1, 2]


def test_a_missing_rng_file_is_warned_about(finished, tmp_path, capsys):
    args, run = _resume(finished, tmp_path, lambda r: (r / CKPT / "rng_rank0.pt").unlink(), **{"train.max_steps": 3, "train.export": "false"})
    assert main(args) == 0
    assert re.search(r"warning: --resume: .*rng_rank0\.pt is missing", capsys.readouterr().out)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (edit_trainer_state(micro_step=10**12), r"'micro_step'=1000000000000 does not fit 'step'=2"),
        (edit_trainer_state(micro_step=1), r"'micro_step'=1 does not fit 'step'=2"),
        (edit_trainer_state(step="2"), r"'step' must be an integer >= 0, got '2'"),
        (edit_trainer_state(step=-1), r"'step' must be an integer >= 0, got -1"),
        (foreign_optimizer, r"optimizer\.pt' holds the optimizer state of another model .*exp_avg of shape"),
    ],
    ids=["micro-huge", "micro-small", "step-string", "step-negative", "optimizer-shapes"],
)
def test_damaged_or_foreign_training_state_is_refused_in_one_line(finished, tmp_path, capsys, damage, message):
    args, run = _resume(finished, tmp_path, damage, **{"train.max_steps": 3, "train.export": "false"})
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search("^molora train: error: --resume: .*" + message, _last_line(err)), err
    assert _train_records(run)[-1]["step"] == 2  # nothing trained


def _strict_json(line: str) -> dict:
    def no_nan(name):
        raise ValueError(f"{name} in metrics.jsonl")

    return json.loads(line, parse_constant=no_nan)


def test_divergence_stops_at_the_first_non_finite_step(tmp_path, capsys):
    extra = {**BASE, "train.max_steps": 6, "train.save_every": 1, "train.lr": 1e6, "train.router_lr": 1e6, "train.max_grad_norm": "null"}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 2
    line = _last_line(capsys.readouterr().err)
    match = re.search(r"^molora train: error: training diverged at step (\d+) .*lower train\.lr \(now 1e\+06\).*max_grad_norm", line)
    assert match, line
    step, run = int(match.group(1)), tmp_path / "run"
    assert step < 6 and not (run / "final").exists() and not (run / "summary.json").exists()
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["type"] == "train"]  # (routing-health records sit beside them)
    assert [r["step"] for r in records] == list(range(1, step))
    assert all(math.isfinite(r["loss"]) for r in records)
    for ckpt in (run / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter" / "molora_model.safetensors").values())


def test_a_huge_lora_alpha_under_bf16_is_warned_about_and_stops(tmp_path, capsys):
    extra = {**BASE, "train.export": "false", "train.save_every": 0, "molora.lora_alpha": 1e30, "train.mixed_precision": "bf16"}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 2
    captured = capsys.readouterr()
    assert re.search(r"warning: molora\.lora_alpha=1e\+30 .*scaling s = lora_alpha / r = 2\.5e\+29.*overflows under bf16", captured.out)
    assert "training diverged at step 1" in _last_line(captured.err)


def test_metrics_log_writes_non_finite_numbers_as_null(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", True, keep_until=None)
    log.write({"type": "eval", "step": 1, "loss": float("nan"), "tasks": {"a": {"loss": float("inf")}}})
    assert _strict_json((tmp_path / "m.jsonl").read_text()) == {"type": "eval", "step": 1, "loss": None, "tasks": {"a": {"loss": None}}}
