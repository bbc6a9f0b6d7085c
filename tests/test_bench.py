"""The benchmark scripts run on tiny shapes and print their tables (no timing assertions)."""

import subprocess
import sys
from pathlib import Path

import pytest

from molora.apps.bench import layer as bench_layer
from molora.apps.bench import train as bench_train
from molora.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY_LAYER = [
    "-T",
    "32",
    "-d",
    "24",
    "-N",
    "4",
    "-r",
    "4",
    "--batch",
    "4",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
]
TINY_TRAIN = [
    "--hidden",
    "32",
    "--layers",
    "1",
    "--heads",
    "4",
    "--vocab",
    "64",
    "--seq",
    "8",
    "--batch",
    "2",
    "-N",
    "4",
    "-r",
    "4",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
]


def test_bench_layer_prints_every_row(capsys, tmp_path):
    md = tmp_path / "RESULTS.md"
    assert bench_layer.main([*TINY_LAYER, "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    for row in ["base (frozen W0)", "peft_lora r=4", "peft_lora r=8"]:
        assert row in out
    for router in ["top2", "soft4", "task"]:
        for impl in ["auto", "dense", "grouped", "grouped_bmm", "hybrid", "eager"]:
            assert f"molora {router} {impl}" in out, f"missing row molora {router} {impl}"
    assert "x LoRA r=4" in out and "saved act MiB" in out
    text = md.read_text()
    assert "<!-- bench_layer_cpu:begin -->" in text and "| molora top2 grouped |" in text
    # a second run replaces its section instead of appending another one
    bench_layer.main([*TINY_LAYER, "--routers", "topk", "--impls", "auto", "--markdown", str(md)])
    assert md.read_text().count("<!-- bench_layer_cpu:begin -->") == 1


@pytest.mark.parametrize("base, w0_mib", [("dense", "0.06"), ("nf4", "0.01")])
def test_bench_layer_base_option_reports_the_stored_w0(capsys, base, w0_mib):
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    args = [*TINY_LAYER, "-d", "128", "--routers", "topk", "--impls", "dense", "--base", base]
    assert bench_layer.main(args) == 0
    out = capsys.readouterr().out
    assert f"W0 {base}" in out and "W0 MiB" in out
    row = next(line for line in out.splitlines() if line.startswith("molora top2 dense"))
    assert row.split()[-2] == w0_mib  # 128 x 128 float32: 64 KiB; NF4: 8 KiB + block scales


def test_bench_train_prints_every_row(capsys, tmp_path):
    md = tmp_path / "RESULTS.md"
    assert bench_train.main([*TINY_TRAIN, "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    for row in [
        "peft_lora r=4",
        "peft_lora r=8",
        "molora top2 of 4",
        "molora soft 4",
        "molora task",
        "mixlora top2 of 4",
    ]:
        assert row in out, f"missing row {row}"
    assert "tokens/s" in out
    assert "bench_train_cpu:begin" in md.read_text()


def test_cli_bench_layer(capsys):
    assert cli_main(["bench", "layer", *TINY_LAYER, "--routers", "topk", "--impls", "auto,grouped", "--no-peft"]) == 0
    out = capsys.readouterr().out
    assert "molora top2 auto" in out and "peft_lora" not in out


@pytest.mark.parametrize("script", ["bench_layer.py", "bench_train.py"])
def test_scripts_show_help(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--markdown" in result.stdout
