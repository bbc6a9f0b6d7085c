"""Adapters and exports record a local base model as an absolute path (a Hub id as it is), so
that they load, and the printed ``vllm serve`` line runs, from any directory."""

from __future__ import annotations

import json
import os

from tiny_models import random_batch, tiny_llama, train_steps
from transformers import AutoModelForCausalLM

from molora import MoLoRAConfig, get_molora_model
from molora.io import base_model_name


def test_a_relative_local_base_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    tiny_llama().save_pretrained(tmp_path / "base_chat")
    monkeypatch.chdir(tmp_path / "work")
    base = AutoModelForCausalLM.from_pretrained("../base_chat")
    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router="task", num_tasks=2)
    model = get_molora_model(base, cfg)
    train_steps(model, random_batch(), task_ids=[0, 1])
    model.save_pretrained("adapter")
    report = model.export_merged_adapter("vllm", task=0, target="vllm")
    where = str((tmp_path / "base_chat").resolve())
    assert json.loads((tmp_path / "work/adapter/molora_config.json").read_text())["base_model_name_or_path"] == where
    assert json.loads((tmp_path / "work/vllm/adapter_config.json").read_text())["base_model_name_or_path"] == where
    assert report["serve"].startswith(f"vllm serve {where} ")
    assert f"vllm={(tmp_path / 'work' / 'vllm').resolve()}" in report["serve"]
    os.chdir(tmp_path)  # from elsewhere, PEFT finds the base by the recorded path
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "work" / "vllm"))


def test_a_hub_id_is_kept_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"
    assert base_model_name(model) == "meta-llama/Llama-3.2-1B"
