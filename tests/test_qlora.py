"""QLoRA: MoLoRA on bitsandbytes 4-bit (NF4) and 8-bit bases, on CPU.

The tiny Llama is saved from config and reloaded with a BitsAndBytesConfig. Its hidden size is
64, not the usual 32: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 inputs.
Exactness checks use float32 compute (``bnb_4bit_compute_dtype``) so that only the adapter
math differs between the compared models; training uses bfloat16 compute, as QLoRA does.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from tiny_models import random_batch, tiny_llama, train_steps

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model  # noqa: E402
from molora.merge.factors import cat_factors  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_llama(**SIZES).save_pretrained(folder)
    return folder


def _load(folder, bits: int | None, compute=torch.float32):
    kwargs = {}
    if bits == 4:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    elif bits == 8:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: optional `kernels` package, int8 casts
        return transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs).eval()


def _task_model(base, **kwargs) -> MoLoRAModel:
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=4, r=4, router="task", num_tasks=2, **kwargs)
    return get_molora_model(base, cfg)


def _batch():
    batch = random_batch(batch=2, seq=9, pad_last=2)
    batch["task_ids"] = torch.tensor([0, 1])
    return batch


@pytest.mark.parametrize(
    "bits, layer_cls, adapter_dtype", [(4, "Linear4bit", torch.bfloat16), (8, "Linear8bitLt", torch.float32)]
)
def test_wraps_quantized_layers_and_starts_as_the_base(base_dir, bits, layer_cls, adapter_dtype):
    base = _load(base_dir, bits, compute=torch.bfloat16)
    batch = _batch()
    with torch.no_grad():  # the same bitsandbytes CPU kernel in both calls (it depends on grad mode)
        ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = _task_model(base, adapter_dtype="base")
    layer = model.molora_layers()["model.layers.0.self_attn.q_proj"]
    assert type(layer.base_layer).__name__ == layer_cls
    assert (layer.in_features, layer.out_features) == (64, 64)
    assert layer.lora_A.dtype == adapter_dtype  # "base" on quantized storage: the compute dtype (4-bit)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"])
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)  # B = 0


@pytest.mark.parametrize("bits", [4, 8])
def test_training_on_a_quantized_base_drops_the_loss_as_on_fp32(base_dir, bits):
    batch = _batch()
    losses = {}
    for name, b in (("fp32", None), ("quantized", bits)):
        torch.manual_seed(0)
        model = _task_model(_load(base_dir, b, compute=torch.bfloat16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses[name] = train_steps(model, batch, steps=8, lr=2e-2)
    fp32, quantized = losses["fp32"], losses["quantized"]
    assert all(math.isfinite(v) for v in quantized)
    assert fp32[-1] < fp32[0] - 0.5
    assert quantized == pytest.approx(fp32, abs=0.05)  # the same descent, up to quantization noise


def test_export_per_task_loads_with_peft_on_the_4bit_base(base_dir, tmp_path):
    from peft import PeftModel

    model = _task_model(_load(base_dir, 4))
    batch = _batch()
    train_steps(model, batch, steps=2, lr=2e-2)
    model.export_merged_adapter(tmp_path / "export", task="all")
    for task in (0, 1):
        ids = batch["input_ids"]
        peft_model = PeftModel.from_pretrained(_load(base_dir, 4), tmp_path / "export" / f"task_{task}").eval()
        with torch.no_grad():  # bitsandbytes picks its CPU kernel by grad mode: the same one for both
            routed = model(input_ids=ids, task_ids=[task, task]).logits
            torch.testing.assert_close(peft_model(input_ids=ids).logits, routed, rtol=0, atol=1e-3)


def test_4bit_export_report_says_how_to_merge_and_that_way_is_right(base_dir, tmp_path):
    """The report's note: PEFT's merge_and_unload on the 4-bit base keeps it 4-bit (the update is
    rounded away); base.dequantize() before PEFT's merge (or molora's merge) gives the routed model."""
    from peft import PeftModel

    model = _task_model(_load(base_dir, 4))
    batch = _batch()
    train_steps(model, batch, steps=3, lr=5e-2)
    report = model.export_merged_adapter(tmp_path / "export", task=1)
    note = report["quantized_base"]
    assert note["kind"] == "4-bit" and "PEFT's merge_and_unload() on the 4-bit base keeps the layers 4-bit" in note["merge"]
    assert "--merge-into-base" in note["merge"] and "MoLoRAModel.merge_and_unload(task=T)" in note["merge"]
    assert "base.dequantize()" in note["merge"]
    ids = batch["input_ids"]
    with torch.no_grad():
        routed = model(input_ids=ids, task_ids=[1, 1]).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept_4bit = PeftModel.from_pretrained(_load(base_dir, 4), tmp_path / "export").merge_and_unload()
        base = _load(base_dir, 4)
        base.dequantize()
        right = PeftModel.from_pretrained(base, tmp_path / "export").merge_and_unload()
    assert type(kept_4bit.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear4bit"
    with torch.no_grad():
        wrong_gap = (kept_4bit(input_ids=ids).logits - routed).abs().max().item()
        right_gap = (right(input_ids=ids).logits - routed).abs().max().item()
    assert right_gap < 5e-3 and wrong_gap > 2 * right_gap, (right_gap, wrong_gap)


@pytest.mark.parametrize("bits, kind", [(4, "4-bit"), (8, "8-bit")])
def test_merge_and_unload_dequantizes_and_merges(base_dir, bits, kind):
    model = _task_model(_load(base_dir, bits))
    batch = _batch()
    train_steps(model, batch, steps=2, lr=2e-2)
    deltas = {
        name: (lambda f: f.lora_B @ f.lora_A)(
            cat_factors(layer.lora_A.detach(), layer.lora_B.detach(), layer.router.task_weights(1), layer.scaling)
        )
        for name, layer in model.molora_layers().items()
    }
    with torch.no_grad():  # an inference forward first: bitsandbytes repacks 4-bit weights on CPU
        routed = model(input_ids=batch["input_ids"], task_ids=[1, 1]).logits
    with pytest.warns(UserWarning, match=f"merge_and_unload on a {kind} .*returned unquantized in torch.float32"):
        merged = model.merge_and_unload(task=1)
    reference = _load(base_dir, bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.dequantize()
    for name, delta in deltas.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        # atol: the CPU repacking keeps the 4-bit block scales in bfloat16 (~2e-4 on these weights)
        torch.testing.assert_close(layer.weight - reference.get_submodule(name).weight, delta, rtol=0, atol=1e-3)
    assert getattr(merged.config, "quantization_config", None) is None
    if bits == 4:  # 8-bit matmuls also quantize the activations: not comparable to a float matmul
        with torch.no_grad():  # atol: bitsandbytes' repacked CPU kernel multiplies in bfloat16
            torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, routed, rtol=0, atol=5e-3)


def test_merge_refuses_quantized_layers_it_cannot_dequantize():
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    layer = layer.to("cpu")  # quantizes the weight to int8
    model = get_molora_model(nn.Sequential(layer), MoLoRAConfig(target_modules=["0"], num_experts=2, r=2))
    with pytest.raises(ValueError, match="bitsandbytes 8-bit weights"):
        model.merge_and_unload(weights={"0": torch.tensor([0.5, 0.5])})


def test_save_and_load_on_the_4bit_base(base_dir, tmp_path):
    model = _task_model(_load(base_dir, 4))
    batch = _batch()
    train_steps(model, batch, steps=2, lr=2e-2)
    model.save_pretrained(tmp_path / "adapter")
    loaded = MoLoRAModel.from_pretrained(_load(base_dir, 4), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_molora_train_with_model_quantization(tmp_path):
    from conftest import TINY_CONFIG, tiny_run_overrides

    from molora.cli import main

    extra = {
        "model.from_config.hidden_size": 64,
        "model.from_config.intermediate_size": 128,
        "model.quantization": "{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}",
        "train.max_steps": 4,
        "train.save_every": 0,
        "train.eval_every": 4,
    }
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "qlora", extra)]) == 0
    run = tmp_path / "qlora"
    losses = [
        json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line
    ]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (run / "final" / "molora_config.json").is_file() and (run / "export").is_dir()
    base = _load(run / "base_model", 4)
    loaded = MoLoRAModel.from_pretrained(base, run / "final")
    assert type(loaded.molora_layers()["model.layers.0.self_attn.q_proj"].base_layer).__name__ == "Linear4bit"


@pytest.mark.parametrize(
    "quantization, message",
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "exactly one of load_in_4bit: true or load_in_8bit: true"),
        ({}, "exactly one of load_in_4bit"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf3"}, r"quant_type' must be one of \['nf4', 'fp4'\]"),
        ({"load_in_4bit": "yes"}, r"'model.quantization.load_in_4bit' must be a bool, got 'yes'"),
        ({"load_in_8bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb_4bit_\\* keys need load_in_4bit"),
        ({"load_in_4bit": True, "bits": 4}, r"'model.quantization.bits' is not a known key"),
    ],
)
def test_run_config_validates_quantization(quantization, message):
    from conftest import TINY_CONFIG

    from molora.training.run_config import RunConfigError, load_run_config

    with pytest.raises(RunConfigError, match=message):
        load_run_config(TINY_CONFIG, [f"model.quantization={json.dumps(quantization)}"])


def test_merge_refuses_a_dequantized_weight_that_does_not_reproduce_the_layer(base_dir):
    """A bitsandbytes whose layout molora misreads (simulated: dequantize() returns scaled weights)."""
    model = _task_model(_load(base_dir, 4))
    train_steps(model, _batch(), steps=1, lr=2e-2)
    base = model.get_base_model()
    real = base.dequantize

    def misread():
        out = real()
        with torch.no_grad():
            base.get_submodule("model.layers.0.self_attn.q_proj.base_layer").weight.mul_(1.5)
        return out

    base.dequantize = misread
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"dequantized 4-bit weight of 'model\.layers\.0\.self_attn\.q_proj' does not reproduce"):
        model.merge_and_unload(task=1)


def test_a_bitsandbytes_without_the_cpu_unpacker_is_a_clear_error(monkeypatch):
    import bitsandbytes.functional

    from molora.merge import quantized

    monkeypatch.delattr(bitsandbytes.functional, "_convert_weight_packed_for_cpu_inverse", raising=False)
    with pytest.raises(ImportError, match=r"bitsandbytes .* lacks: install a supported version .*bitsandbytes>=0\.45,<0\.51"):
        quantized._cpu_unpacker()


def test_the_qlora_extra_bounds_bitsandbytes():
    import tomllib
    from pathlib import Path

    from molora.merge.quantized import BNB_SUPPORTED

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("qlora", "test"):
        assert f"bitsandbytes{BNB_SUPPORTED}" in extras[extra]
