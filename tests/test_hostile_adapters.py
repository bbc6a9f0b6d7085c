"""Adapter files that are damaged or hostile: NaN/inf weights (warned at load, refused at
export naming the layer), integer or bool tensors (refused at load), a config whose
num_experts or r would allocate far more than the file holds (refused from the header,
before anything is allocated)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model

LAYER = "model.layers.1.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    """A saved adapter after one optimizer step (B nonzero)."""
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2))
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.lora_B.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _edit_weights(folder, edit) -> None:
    path = folder / "molora_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(folder, edit) -> None:
    path = folder / "molora_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_nan_weights_warn_at_load_and_are_refused_at_export_naming_the_layer(saved, tmp_path):
    _edit_weights(saved, lambda s: s[f"{LAYER}.lora_B"].__setitem__((0, 0, 0), float("nan")))
    with pytest.warns(UserWarning, match=f"NaN or inf weights in 1 layer.*{LAYER}"):
        model = MoLoRAModel.from_pretrained(tiny_llama(), saved)
    with pytest.raises(ValueError, match=f"NaN or inf weights in layer '{LAYER}'.*nothing was exported"):
        model.export_merged_adapter(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match=f"NaN or inf weights in layer '{LAYER}'"):
        model.merge_and_unload()


def test_finite_weights_load_without_a_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoLoRAModel.from_pretrained(tiny_llama(), saved)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8])
def test_integer_or_bool_tensors_are_refused_at_load(saved, dtype):
    key = f"{LAYER}.lora_A"
    _edit_weights(saved, lambda s: s.__setitem__(key, s[key].to(dtype)))
    name = {torch.bool: "BOOL", torch.int64: "I64", torch.uint8: "U8"}[dtype]
    with pytest.raises(ValueError, match=f"non-float tensors.*'{LAYER}.lora_A' of dtype {name}"):
        MoLoRAModel.from_pretrained(tiny_llama(), saved)


@pytest.mark.parametrize("field", ["num_experts", "r"])
def test_a_hostile_config_is_refused_from_the_header_before_allocating(saved, monkeypatch, field):
    """The metadata is edited consistently (modules say the same), only the file is honest."""

    def edit(meta):
        meta["config"][field] = 10**6
        for entry in meta["modules"].values():
            entry[field] = 10**6

    _edit_config(saved, edit)
    import molora.model as model_module

    def no_build(*args, **kwargs):  # reaching the build would allocate 10**6 experts/ranks
        raise AssertionError("the adapter was built before its shapes were checked")

    monkeypatch.setattr(model_module.MoLoRAModel, "__init__", no_build)
    with pytest.raises(ValueError, match=r"tensor \(as the config builds it\) '.*lora_[AB]': saved \[.*1000000"):
        MoLoRAModel.from_pretrained(tiny_llama(), saved)


@pytest.mark.parametrize(("field", "value", "message"), [("r", "4", r"`r` must be an int >= 1, got '4'"), ("router", "best", "router")])
def test_inspect_refuses_an_adapter_with_an_invalid_config(saved, capsys, field, value, message):
    from molora.cli import main

    _edit_config(saved, lambda meta: meta["config"].__setitem__(field, value))
    assert main(["inspect", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(r"molora inspect: .*molora_config\.json: its config is invalid: .*" + message, err), err
