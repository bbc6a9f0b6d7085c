"""``molora bench gpu`` and ``scripts/gpu_check.sh`` on CPU: parsing, the plan, results writing
(with fake measurements) and skipping cleanly without CUDA. The GPU run itself is not tested here."""

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch

from molora.apps.bench import gpu

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_plan_runs_the_three_steps_with_the_issue_shapes():
    steps = gpu.plan(parse("--markdown", "R.md"))
    assert [s.name for s in steps] == ["tests", "layer", "train"]
    tests, layer, train = (s.argv for s in steps)
    assert tests[-5:] == ["pytest", "-m", "gpu", "-q", "tests"]
    joined = " ".join(layer)
    for flag in ["--dtype bfloat16", "--tokens 4096", "--dim 4096", "--experts 8", "--rank 16", "--top-k 2"]:
        assert flag in joined
    assert "triton" in layer[layer.index("--impls") + 1].split(",")
    assert "--routers topk,soft,task" in joined and "--markdown R.md" in joined
    assert "--hidden 2048" in " ".join(train) and "mixlora" in train[train.index("--variants") + 1]
    assert sum(s.timeout_s for s in steps) < 8 * 60


def test_unknown_step_is_an_error():
    with pytest.raises(ValueError, match=r"`--steps` has unknown steps \['bogus'\]"):
        gpu.plan(parse("--steps", "tests,bogus"))


def test_dry_run_prints_the_plan(capsys):
    assert gpu.run(parse("--dry-run", "--steps", "layer")) == 0
    assert "layer (<= 150 s):" in capsys.readouterr().out


def test_without_cuda_nothing_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "run_step", lambda step: pytest.fail("a step ran without CUDA"))
    markdown = tmp_path / "R.md"
    assert gpu.run(parse("--markdown", str(markdown))) == 0
    assert "no CUDA device here; nothing measured" in capsys.readouterr().out
    assert gpu.run(parse("--markdown", str(markdown), "--require-cuda")) == gpu.EXIT_NO_CUDA
    assert not markdown.exists()


def test_results_file_with_fake_measurements(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "device_name", lambda: "NVIDIA H100 80GB HBM3 (sm90, 79 GiB)")
    fake = {"tests": (0, "12 passed"), "layer": (1, "boom | bad"), "train": (None, "")}
    monkeypatch.setattr(
        gpu, "run_step", lambda step: gpu.StepResult(step.name, *fake[step.name][:1], 2.0, fake[step.name][1])
    )
    markdown, out = tmp_path / "bench" / "RESULTS-gpu.md", tmp_path / "out"
    markdown.parent.mkdir()
    assert gpu.run(parse("--markdown", str(markdown), "--out-dir", str(out))) == 1  # a step failed
    text = markdown.read_text()
    assert "- device: NVIDIA H100 80GB HBM3 (sm90, 79 GiB)" in text
    assert "| tests | ok | 2 | 12 passed |" in text
    assert "| layer | exit 1 | 2 | boom \\| bad |" in text and "| train | timed out |" in text
    assert (out / "RESULTS-gpu.md").read_text() == text
    gpu.write_results(str(markdown), None, "again", [])  # the section is replaced, not appended
    assert markdown.read_text().count("<!-- gpu_check:begin -->") == 1


def test_run_step_reports_exit_code_and_timeout():
    ok = gpu.run_step(gpu.Step("echo", ["python", "-c", "print('hello')"], 30))
    assert ok.returncode == 0 and ok.tail == "hello"
    slow = gpu.run_step(gpu.Step("sleep", ["python", "-c", "import time; time.sleep(5)"], 1))
    assert slow.returncode is None


def test_script_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would measure")
    env = {**os.environ, "GPU_CHECK_NO_INSTALL": "1"}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here; nothing measured" in proc.stdout


def test_cli_lists_the_gpu_benchmark(capsys):
    from molora.apps.cli import main

    assert main(["bench", "gpu", "--dry-run", "--steps", "tests"]) == 0
    assert "pytest -m gpu -q tests" in capsys.readouterr().out
