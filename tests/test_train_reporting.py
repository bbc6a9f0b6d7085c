"""train.report_to: [tensorboard], tokens/s and ETA in the train records, train.eval_samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, tiny_run_overrides

from molora.cli import main

pytest.importorskip("tensorboard")


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    extra = {"train.max_steps": 4, "train.eval_every": 2, "train.save_every": 0, "train.report_to": "[tensorboard]",
             "train.eval_samples": 2, "train.eval_sample_tokens": 4, "train.max_eval_batches": 1, "train.export": False}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(root, "run", extra)]) == 0
    return root / "run"


def test_tensorboard_gets_the_metrics_scalars(reported_run):
    records = [json.loads(line) for line in (reported_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    acc = _events(reported_run / "tensorboard")
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/aux_loss", "train/tokens_per_s", "train/eta_s", "eval/tasks/reverse/loss", "eval/tasks/sort/accuracy"):
        assert tag in tags, (tag, tags)
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in train}, rel=1e-6)
    # tokens/s and an ETA beside the loss
    assert all(r["tokens_per_s"] > 0 and r["eta_s"] >= 0 for r in train)
    assert train[-1]["eta_s"] == 0


def test_eval_samples_are_logged_and_inspect_shows_the_latest(reported_run, capsys):
    records = [json.loads(line) for line in (reported_run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert sorted(record["tasks"]) == ["reverse", "sort"]
        for rows in record["tasks"].values():
            assert len(rows) == 2 and all(set(row) == {"prompt", "completion", "reference"} for row in rows)
    first = records[-1]["tasks"]["reverse"][0]
    assert first["prompt"].startswith("reverse: ") and first["reference"].strip()
    assert "samples/reverse/text_summary" in _events(reported_run / "tensorboard").Tags()["tensors"]
    assert main(["inspect", str(reported_run), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "eval samples at step 4" in out and repr(first["prompt"]) in out


def test_every_numeric_field_of_a_record_reaches_tensorboard(tmp_path):
    """Figures another part of the loop adds to metrics.jsonl (routing health) reach TensorBoard too."""
    from molora.training.metrics import MetricsLog
    from molora.training.reporting import TensorBoardSink

    log = MetricsLog(tmp_path / "metrics.jsonl", True, keep_until=None, sinks=[TensorBoardSink(tmp_path / "tb")])
    log.write({"type": "eval", "step": 3, "routing_health": {"layers.0.q_proj": {"entropy": 0.25, "dead": 1}}, "routing": {"x": {"load": [0.5, 0.5]}}})
    log.close()
    acc = _events(tmp_path / "tb")
    assert acc.Scalars("eval/routing_health/layers.0.q_proj/entropy")[0].value == 0.25
    assert acc.Scalars("eval/routing_health/layers.0.q_proj/dead")[0].step == 3
    assert not any(tag.startswith("eval/routing/") for tag in acc.Tags()["scalars"])
