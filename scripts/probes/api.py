"""Probe cases for the Python API: configs, model building, forwards, loads and exports."""

from __future__ import annotations

from pathlib import Path

import torch

from probes import api_error
from probes.common import a_file, edit_json, model, random_batch, saved, tiny_llama

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model


def _set(cfg: MoLoRAConfig, name: str, value) -> None:
    setattr(cfg, name, value)


def _corrupt_json(tmp: Path) -> Path:
    path = saved(tmp, "c")
    (path / "molora_config.json").write_text("{not json")
    return path


def _truncated(tmp: Path) -> Path:
    path = saved(tmp, "t")
    weights = path / "molora_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


_IDS = random_batch()["input_ids"]

api_error("config use_rslora='false'", lambda tmp: MoLoRAConfig(use_rslora="false"), "use_rslora")
api_error("config lora_alpha=inf", lambda tmp: MoLoRAConfig(lora_alpha=float("inf")), "lora_alpha")
api_error("config target_modules='q_proj(('", lambda tmp: MoLoRAConfig(target_modules="q_proj(("), "target_modules")
api_error("config task_names ['x','x']", lambda tmp: MoLoRAConfig(router="task", num_tasks=2, task_names=["x", "x"]), "task_names")
api_error("config top_k=99 set after construction", lambda tmp: _set(MoLoRAConfig(), "top_k", 99), "top_k")
api_error("config unknown key num_expert", lambda tmp: MoLoRAConfig.from_dict({"num_expert": 4}), "num_expert")
api_error("build: target module typo 'qproj'", lambda tmp: get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["qproj"])), "target_modules")
api_error("build: target 'mlp' is not linear", lambda tmp: get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["mlp"])), "mlp")
api_error("forward task_ids [0.9, 1.7]", lambda tmp: model()(input_ids=_IDS, task_ids=[0.9, 1.7]), "task_ids")
api_error("forward task_ids bool tensor", lambda tmp: model()(input_ids=_IDS, task_ids=torch.tensor([True, False])), "task_ids")
api_error("forward task_ids [1] for batch 2", lambda tmp: model()(input_ids=_IDS, task_ids=[1]), "task_ids")
api_error("forward task_ids [0, 5] (2 tasks)", lambda tmp: model()(input_ids=_IDS, task_ids=[0, 5]), "task_ids")
api_error("forward task_ids unknown name", lambda tmp: model()(input_ids=_IDS, task_ids=["a", "b"]), "task")
api_error("forward task router without task_ids", lambda tmp: model()(input_ids=_IDS), "task_ids")
api_error("load: empty folder", lambda tmp: MoLoRAModel.from_pretrained(tiny_llama(), tmp), "molora_config.json")
api_error("load: corrupt JSON config", lambda tmp: MoLoRAModel.from_pretrained(tiny_llama(), _corrupt_json(tmp)), "JSON")
api_error("load: truncated safetensors", lambda tmp: MoLoRAModel.from_pretrained(tiny_llama(), _truncated(tmp)), "safetensors")
api_error("load: other base (hidden 64)", lambda tmp: MoLoRAModel.from_pretrained(tiny_llama(hidden_size=64), saved(tmp, "o")), "does not fit")
api_error("load: 'config': null",
          lambda tmp: MoLoRAModel.from_pretrained(tiny_llama(), edit_json(saved(tmp, "n") / "molora_config.json", "config", None)),
          "config")
api_error("save onto an existing file", lambda tmp: model().save_pretrained(a_file(tmp)), "not a folder")
api_error("export weights of shape (3,)", lambda tmp: model().export_merged_adapter(tmp / "e1", weights=torch.ones(3)), "weights")
api_error("export task=7 of 2", lambda tmp: model().export_merged_adapter(tmp / "e2", task=7), "task")
api_error("export svd rank=2,000,000", lambda tmp: model().export_merged_adapter(tmp / "e3", method="svd", rank=2_000_000), "rank")
api_error("export weights='measured' string", lambda tmp: model().export_merged_adapter(tmp / "e4", weights="measured"), "weights")
api_error("export task= on a top-k router", lambda tmp: model("topk", top_k=1).export_merged_adapter(tmp / "e5", task=0), "task")
