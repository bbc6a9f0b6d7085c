"""Shared test fixtures: tiny models built from config, the repo's configs, offline settings.

Everything here is hermetic: no network (HF_HUB_OFFLINE), no downloaded weights or data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on shared cores OpenMP's spinning threads
# make every test many times slower (55 s vs 1.5 s measured). Export OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without CUDA, Triton kernels can only run under Triton's CPU interpreter, which is chosen when a
# kernel (triton's own library included) is defined: set it before anything imports triton, so
# that tests/test_triton_kernels.py checks molora's kernels in-process. With CUDA the variable is
# left alone and that file runs its interpreter checks in a subprocess.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"



def triton_interpreted() -> bool:
    """Whether triton is installed and runs under its CPU interpreter in this process."""
    try:
        from triton.language import standard
    except ImportError:
        return False
    return type(standard.sum).__name__ == "InterpretedFunction"


needs_triton_interpreter = pytest.mark.skipif(
    not triton_interpreted(), reason="triton is not installed, or its CPU interpreter is not active in this process"
)


def interpreted_triton_kernels():
    """molora's kernel module, rebuilt under the interpreter if it was imported before the variable was set."""
    import importlib

    kernels = importlib.import_module("molora.core.kernels.triton_kernels")
    if not kernels.INTERPRETED:
        importlib.reload(kernels)
    return kernels


REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
TINY_CONFIG = CONFIGS_DIR / "tiny.yaml"

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def tiny_config_path() -> Path:
    """configs/tiny.yaml: two synthetic tasks (configs/data/), tiny Llama from config."""
    return TINY_CONFIG


def tiny_run_overrides(root: Path, out: str = "run", extra: dict | None = None) -> list[str]:
    """Dotted overrides that make configs/tiny.yaml a few-second run writing to root/out."""
    values = {
        "train.output_dir": str(root / out),
        "data.cache_dir": str(root / "ds_cache"),
        "train.max_steps": 6,
        "train.grad_accum": 1,
        "train.batch_size": 4,
        "train.eval_every": 3,
        "train.save_every": 3,
        "train.log_every": 1,
        "train.max_eval_batches": 2,
        "train.progress_bar": False,
    }
    values.update(extra or {})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_overrides(tmp_path):
    """Factory: :func:`tiny_run_overrides` writing into tmp_path."""

    def make(out: str = "run", extra: dict | None = None) -> list[str]:
        return tiny_run_overrides(tmp_path, out, extra)

    return make


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
