"""Base models that do not fit the run: sequences longer than the model's positions (refused
for a learned position table, warned for RoPE), folders with pickle weights only, configs whose
``architectures`` names something that is not a model class, unreadable weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides
from tiny_models import tiny_gpt2, tiny_llama

from molora import MoLoRAConfig, get_molora_model
from molora.cli import main

QUICK = {"train.max_steps": 1, "train.save_every": 0, "train.eval_every": 0, "train.export": "false"}
GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4, n_positions: 16, vocab_size: 260}"


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1].split("\r")[-1]


def test_max_length_above_learned_positions_is_refused_before_training(tmp_path, capsys):
    extra = {**QUICK, "model.from_config": GPT2, "molora.target_modules": "[c_attn]", "data.max_length": 32}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 2
    line = _last_line(capsys.readouterr().err)
    assert re.search(r"^molora train: error: data\.max_length=32 is above the base model's 16 learned positions .*wpe", line), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_max_length_above_rope_positions_is_warned_about(tmp_path, capsys):
    extra = {**QUICK, "model.from_config.max_position_embeddings": 16, "data.max_length": 32}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 0
    assert "warning: data.max_length=32 is above the base model's max_position_embeddings=16" in capsys.readouterr().out


def test_check_positions_within_the_table_is_silent():
    from molora.training.base_model import check_positions

    said = []
    check_positions(tiny_gpt2(n_positions=64), 64, said.append)
    check_positions(tiny_llama(), 128, said.append)
    assert said == []


def _pickle_only_base(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "base")
    for path in (tmp_path / "base").glob("*.safetensors"):
        path.unlink()
    _pickle(tmp_path / "base")
    assert list((tmp_path / "base").glob("*.bin")) and not list((tmp_path / "base").glob("*.safetensors"))
    return tmp_path / "base"


def test_a_base_folder_with_pickle_weights_only_is_refused(tmp_path, capsys):
    base = _pickle_only_base(tmp_path)
    extra = {**QUICK, "model.from_config": "null", "model.name_or_path": str(base), "model.tokenizer": "byte"}
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 2
    line = _last_line(capsys.readouterr().err)
    assert re.search(r"model\.name_or_path=.*holds pickle weights only \(pytorch_model\.bin\)", line), line


def _adapter(tmp_path: Path, base: Path) -> Path:
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="soft"))
    with torch.no_grad():
        model.molora_layers()["model.layers.0.self_attn.q_proj"].lora_B.normal_()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: _set_architectures(b, ["LlamaConfig"]), r"architectures\[0\]='LlamaConfig' is not a transformers model class"),
        (lambda b: _set_architectures(b, ["os.system"]), r"architectures\[0\]='os\.system' is not a transformers model class"),
        (lambda b: (b / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}"), "cannot load the base model"),
        (lambda b: [p.unlink() for p in b.glob("*.safetensors")] and _pickle(b), "holds pickle weights only"),
    ],
    ids=["config-class", "function-name", "corrupt-weights", "pickle-only"],
)
def test_export_refuses_a_bad_base_folder_in_one_line(tmp_path, capsys, damage, message):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    damage(base)
    adapter = _adapter(tmp_path, base)
    assert main(["export", str(adapter), "--out", str(tmp_path / "out"), "--base", str(base), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^molora export: error: .*" + message, _last_line(err)), err


def _set_architectures(base: Path, value) -> None:
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = value
    (base / "config.json").write_text(json.dumps(config))


def _pickle(base: Path) -> None:
    torch.save(tiny_llama().state_dict(), base / "pytorch_model.bin")
