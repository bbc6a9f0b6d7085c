"""A `molora train` run prints nothing from the libraries molora calls: no warnings (transformers'
v5 FutureWarnings from molora's own calls, bitsandbytes' optional-kernel message), no transformers
log lines, and no progress bars where the run asked for none (`train.progress_bar: false`, or a
rank other than 0)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, TINY_CONFIG, tiny_run_overrides

from molora.training.quiet import library_progress, quiet_bitsandbytes_import

NOISE = re.compile(r"Warning|warnings\.warn|^\[transformers\]|examples/s|it/s\]|Generating train split|Map:", re.M)


def _train(tmp_path, extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the filters a user has
    env["PYTHONPATH"] = str(REPO_ROOT)
    args = tiny_run_overrides(tmp_path, "run", {"train.max_steps": 2, "train.eval_every": 2, **extra})
    cmd = [sys.executable, "-m", "molora.cli", "train", str(TINY_CONFIG), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_tiny_train_prints_no_third_party_noise(tmp_path):
    err = _train(tmp_path, {"model.gradient_checkpointing": "true"})
    assert not NOISE.search(err), err[-3000:]


def test_qlora_train_prints_no_third_party_noise(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    quantization = "{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}"
    extra = {
        "model.from_config.hidden_size": 64,
        "model.from_config.intermediate_size": 128,
        "model.quantization": quantization,
        "model.gradient_checkpointing": "true",
    }
    err = _train(tmp_path, extra)
    assert not NOISE.search(err), err[-3000:]


def test_export_with_no_progress_prints_no_library_bars(tmp_path):
    """``--no-progress`` hid molora's bars but not transformers' "Loading weights" and "Writing
    model shards" bars, which a merge into the base prints."""
    _train(tmp_path, {"train.export": "false"})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for extra in (["--out", "exp"], ["--merge-into-base", "--out", "merged"]):
        cmd = [sys.executable, "-m", "molora.cli", "export", "run", *extra, "--no-progress"]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not NOISE.search(proc.stderr) and "it/s" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "merged" / "config.json").is_file()


def test_bitsandbytes_kernel_message_is_dropped_and_others_kept(caplog):
    quiet_bitsandbytes_import()
    quiet_bitsandbytes_import()  # once only
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no net")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_library_progress_off_inside_and_restored():
    import datasets
    from transformers.utils import logging as hf_logging

    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
    with library_progress(False):
        assert not datasets.is_progress_bar_enabled() and not hf_logging.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
    with library_progress(True):
        assert datasets.is_progress_bar_enabled()
