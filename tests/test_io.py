"""Save/load: round trips, validation against the base model, corrupt files, atomic writes."""

import json

import pytest
import torch
from tiny_models import random_batch, tiny_gpt2, tiny_llama, train_steps

from molora import MoLoRAConfig, MoLoRALinear, MoLoRAModel, get_molora_model
from molora import atomic as molora_io


def trained(router="task", build=tiny_llama, targets=("q_proj", "v_proj", "down_proj")):
    top_k = None if router == "soft" else 2
    cfg = MoLoRAConfig(target_modules=list(targets), num_experts=3, r=2, router=router, num_tasks=2, top_k=top_k)
    model = get_molora_model(build(), cfg)
    train_steps(model, random_batch(), steps=2, task_ids=torch.tensor([0, 1]))
    return model


@pytest.mark.parametrize("router", ["task", "topk", "soft"])
def test_round_trip_gives_identical_logits(tmp_path, router):
    model = trained(router)
    batch = random_batch()
    task_ids = torch.tensor([1, 0])
    want = model(input_ids=batch["input_ids"], task_ids=task_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["molora_config.json", "molora_model.safetensors"]
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(input_ids=batch["input_ids"], task_ids=task_ids).logits, want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = MoLoRAModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_gpt2_conv1d_round_trip(tmp_path):
    model = trained(build=tiny_gpt2, targets=("c_attn", "c_fc"))
    ids = random_batch()["input_ids"]
    want = model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "molora_config.json").read_text())
    assert meta["modules"]["transformer.h.0.attn.c_attn"] == {"in_features": 32, "out_features": 96, "fan_in_fan_out": True}
    loaded = MoLoRAModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids, task_ids=torch.tensor([0, 1])).logits, want, rtol=0, atol=0)


def test_mismatched_base_model_is_rejected_before_anything_is_assigned(tmp_path):
    trained().save_pretrained(tmp_path)
    other = tiny_llama(intermediate_size=48)  # down_proj is 48 -> 32 instead of 64 -> 32
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as err:
        MoLoRAModel.from_pretrained(other, tmp_path)
    message = str(err.value)
    assert "nothing was loaded" in message and "model.layers.0.mlp.down_proj" in message and "'in_features': 64" in message
    assert not any(isinstance(m, MoLoRALinear) for m in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match="matched no module"):
        MoLoRAModel.from_pretrained(gpt2, tmp_path)


def test_corrupt_and_missing_files(tmp_path):
    trained().save_pretrained(tmp_path)
    weights = tmp_path / "molora_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:20])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="molora_model.safetensors is missing"):
        MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / "molora_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="molora_config.json is missing"):
        MoLoRAModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")


def test_tensor_file_that_disagrees_with_its_metadata(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "molora_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.lora_A"
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, tmp_path / "molora_model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.q_proj.lora_A': saved \[3, 2, 32\], found \[3, 1, 32\]"):
        MoLoRAModel.from_pretrained(tiny_llama(), tmp_path)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = trained()
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        next(iter(model.molora_layers().values())).lora_B.add_(1.0)

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(molora_io, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files left, old files untouched
