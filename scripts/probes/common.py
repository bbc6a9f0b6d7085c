"""Builders shared by the probe modules: tiny trained models, saved adapters, a saved base."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from probes import ROOT

from tiny_models import random_batch, tiny_llama, train_steps  # noqa: E402 - tests/ is on sys.path (probes/__init__)

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model  # noqa: E402

try:  # no "Writing model shards" bars between the table's rows
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover - older transformers
    pass

TINY = str(ROOT / "configs" / "tiny.yaml")
__all__ = ["TINY", "model", "saved", "base", "edit_json", "a_file", "random_batch", "tiny_llama"]


def model(router: str = "task", **kw) -> MoLoRAModel:
    """A tiny Llama with a 2-expert MoLoRA on q/v, after one optimizer step."""
    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router=router, num_tasks=2, **kw)
    out = get_molora_model(tiny_llama(), cfg)
    train_steps(out, random_batch(), task_ids=torch.tensor([0, 1]))
    return out


def saved(tmp: Path, name: str) -> Path:
    """``model()`` saved to ``tmp / name``."""
    model().save_pretrained(tmp / name)
    return tmp / name


def base(tmp: Path) -> str:
    """The tiny Llama saved as a base model folder."""
    tiny_llama().save_pretrained(tmp / "base")
    return str(tmp / "base")


def edit_json(path: Path, key: str, value) -> Path:
    """Set ``key`` in the JSON file ``path``; returns its folder."""
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    return path.parent


def a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file"
