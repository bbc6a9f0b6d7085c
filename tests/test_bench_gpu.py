"""``molora bench gpu`` and ``scripts/gpu_check.sh`` on CPU: parsing, the plan, results writing
(with fake measurements) and skipping cleanly without CUDA. The GPU run itself is not tested here."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from molora.apps.bench import gpu

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_plan_runs_the_four_steps_with_the_issue_shapes():
    steps = gpu.plan(parse("--markdown", "R.md"))
    assert [s.name for s in steps] == ["cpu", "tests", "layer", "train"]
    cpu, tests, layer, train = (s.argv for s in steps)
    assert "tests/test_experts.py" in cpu and steps[0].env == {"CUDA_VISIBLE_DEVICES": ""}  # torch floor, on CPU
    assert tests[-4:] == ["-m", "gpu", "tests/test_gpu.py", "tests/test_gpu_real.py"]
    joined = " ".join(layer)
    for flag in ["--dtype bfloat16", "--tokens 4096", "--dim 4096", "--experts 8", "--rank 16", "--top-k 2"]:
        assert flag in joined
    assert "triton" in layer[layer.index("--impls") + 1].split(",")
    assert "--routers topk,soft,task" in joined and "--markdown R.md" in joined
    assert "--hidden 2048" in " ".join(train) and "mixlora" in train[train.index("--variants") + 1]
    assert sum(s.timeout_s for s in steps) < 6 * 60


def test_unknown_step_is_an_error():
    with pytest.raises(ValueError, match=r"`--steps` has unknown steps \['bogus'\]"):
        gpu.plan(parse("--steps", "tests,bogus"))


def test_dry_run_prints_the_plan(capsys):
    assert gpu.run(parse("--dry-run", "--steps", "layer")) == 0
    assert "layer (<= 60 s):" in capsys.readouterr().out


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
    fake = {"cpu": (0, "80 passed"), "tests": (0, "12 passed"), "layer": (1, "boom | bad"), "train": (None, "")}
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


def test_script_without_cuda_exits_at_once_and_never_calls_pip(tmp_path):
    """No CUDA: a message and exit 0 before any install; a `pip` on PATH that records calls
    shows that nothing was installed even with GPU_CHECK_WHEELS set."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would measure")
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "pip-calls"
    for name in ["pip", "pip3"]:
        (fake / name).write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "GPU_CHECK_WHEELS": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "gpu_check: no CUDA device here" in proc.stdout
    assert not calls.exists()


def test_script_calls_pip_only_offline_and_only_with_a_wheel_folder():
    text = (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    pip_lines = [line for line in code if "pip install" in line]
    assert pip_lines and all("--no-index" in line and '--find-links "$wheels"' in line for line in pip_lines), pip_lines
    assert all("[ -n \"$wheels\" ]" in "\n".join(code[max(0, code.index(line) - 3) : code.index(line)]) for line in pip_lines)
    assert "PIP_NO_INDEX=1" in text


def test_gpu_path_never_imports_datasets():
    """The GPU machines have no `datasets`: the check's modules and a tiny run of the layer and
    training benchmarks work with it blocked."""
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "from molora.apps.cli import main\n"
        "assert main(['bench', 'gpu', '--dry-run']) == 0\n"
        "assert main(['bench', 'layer', '--device', 'cpu', '--tokens', '16', '--dim', '32', '--experts', '4',"
        " '--rank', '4', '--impls', 'dense', '--routers', 'topk', '--repeats', '1', '--warmup', '0']) == 0\n"
        "assert main(['bench', 'train', '--device', 'cpu', '--hidden', '32', '--layers', '1', '--heads', '2',"
        " '--seq', '8', '--batch', '1', '--vocab', '64', '--variants', 'peft_r,molora_topk', '--repeats', '1',"
        " '--warmup', '0']) == 0\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_cli_lists_the_gpu_benchmark(capsys):
    from molora.apps.cli import main

    assert main(["bench", "gpu", "--dry-run", "--steps", "tests"]) == 0
    assert "-m gpu tests/test_gpu.py tests/test_gpu_real.py" in capsys.readouterr().out
