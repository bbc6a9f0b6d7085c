"""The everyday loop: chat data, tokenizer messages, inspect ADAPTER_DIR, tasks by name in the CLI,
routing reports, from_lora_adapters with relative paths, the training loss on the terminal."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides
from datasets import Dataset
from tiny_models import VOCAB, tiny_llama

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.cli import main
from molora.training.data import IGNORE_INDEX, tokenize_chat
from molora.training.tokenizer import build_byte_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_tokenizer():
    tok = build_byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_rows_supervise_assistant_turns_only():
    tok = _chat_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ds = Dataset.from_list([{"messages": messages, "task_ids": 1}])
    row = tokenize_chat(ds, tok, max_length=200)[0]
    assert tok.decode(row["input_ids"]) == (
        "<s><|system|>be brief</s><|user|>hi</s><|assistant|>yo</s><|user|>again</s><|assistant|>ok</s>"
    )
    supervised = [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "yo</s>ok</s>"  # the answers and their end of turn, not the headers
    assert row["task_ids"] == 1 and len(row["attention_mask"]) == len(row["input_ids"])
    short = tokenize_chat(ds, tok, max_length=10)[0]
    assert len(short["input_ids"]) == 10 and all(label == IGNORE_INDEX for label in short["labels"])
    with pytest.raises(ValueError, match="has none: set data.chat_template"):
        tokenize_chat(ds, build_byte_tokenizer())
    bad = Dataset.from_list([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}])
    with pytest.raises(ValueError, match="message 1 must be"):
        tokenize_chat(bad, tok)


def test_run_data_detects_chat_rows(tmp_path):
    from molora.training.loaders import _tokenize_columns as _tokenize
    from molora.training.run_config import load_run_config

    config = load_run_config(TINY_CONFIG)
    spec = next(iter(config.data.tasks.values()))
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    row = _tokenize(ds, spec, config, _chat_tokenizer())[0]
    assert sum(label != IGNORE_INDEX for label in row["labels"]) == 2  # "a" and </s>


def test_tokenizerless_model_folder_names_model_tokenizer(tmp_path):
    from molora.training.run_config import load_run_config
    from molora.training.tokenizer import load_tokenizer

    tiny_llama().save_pretrained(str(tmp_path / "base"))
    config = load_run_config(
        TINY_CONFIG, ["model.from_config=null", f"model.name_or_path={tmp_path / 'base'}", "model.tokenizer=null"]
    )
    with pytest.raises(FileNotFoundError, match="pass model.tokenizer="):
        load_tokenizer(config)


def _task_model(names=("sum", "copy")):
    base = tiny_llama().train()
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "v_proj"],
        num_experts=3,
        r=2,
        router="task",
        num_tasks=len(names),
        task_names=list(names),
    )
    model = get_molora_model(base, cfg)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids, task_ids=list(names)).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    return model.eval()


def test_inspect_adapter_folders_and_export_a_task_by_name(tmp_path, capsys):
    model = _task_model()
    tiny_base = tmp_path / "base"
    fresh = tiny_llama()
    fresh.save_pretrained(str(tiny_base))
    model.base_model.config._name_or_path = str(tiny_base)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "MoLoRA adapter" in out and "router='task'" in out and "per-task gates" in out
    assert f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,d} parameters" in out
    gates = model.molora_layers()["model.layers.0.self_attn.q_proj"].router.task_weights(1)
    assert " ".join(f"{w:.2f}" for w in gates.tolist()) in out

    assert (
        main(
            [
                "export",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "copy"),
                "--task",
                "copy",
                "--target",
                "vllm",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "copy" / "merge_report.json").read_text())
    assert report["task"] == "copy" and report["max_lora_rank"] == 8
    assert "--max-lora-rank 8" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert "PEFT LoRA adapter" in out and "vLLM: servable as it is" in out and "target vllm" in out
    assert main(["check-vllm", str(tmp_path / "copy"), "--max-lora-rank", "16"]) == 0
    assert "OK for vLLM" in capsys.readouterr().out
    assert (
        main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "p"), "--task", "copy", "--no-progress"])
        == 0
    )  # plain PEFT export: rank 6 is not in vLLM's set but servable at 8
    assert main(["check-vllm", str(tmp_path / "p"), "--max-lora-rank", "8"]) == 0
    assert main(["check-vllm", str(tmp_path / "nowhere")]) == 2


def test_routing_report_per_layer_and_task(tmp_path, capsys):
    base = tiny_llama()
    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=4, r=2, router="topk", top_k=2, task_names=["a", "b"])
    model = get_molora_model(base, cfg).eval()
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, task_ids=["a", "b", "b"])
    report = model.routing_report()
    layer = report["model.layers.0.self_attn.q_proj"]
    assert layer["all"]["tokens"] == 13 and layer["tasks"]["a"]["tokens"] == 3 and layer["tasks"]["b"]["tokens"] == 10
    assert sum(layer["all"]["load"]) == pytest.approx(2.0) and sum(layer["tasks"]["b"]["load"]) == pytest.approx(2.0)
    stats = model.routing_stats()["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(stats["load"], torch.tensor(layer["all"]["load"]))
    mixed = (3 * torch.tensor(layer["tasks"]["a"]["gates"]) + 10 * torch.tensor(layer["tasks"]["b"]["gates"])) / 13
    torch.testing.assert_close(mixed, torch.tensor(layer["all"]["gates"]))
    model.print_routing(tmp_path / "routing.png")
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and "% of the real tokens" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "routing.png").stat().st_size > 0


def test_from_lora_adapters_accepts_a_relative_base_path(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    from transformers import AutoModelForCausalLM

    absolute = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        lora = peft.get_peft_model(
            copy.deepcopy(absolute), peft.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False)
        )
        lora.save_pretrained(str(tmp_path / f"a{i}"))
        paths.append(tmp_path / f"a{i}")
    monkeypatch.chdir(tmp_path)
    relative = AutoModelForCausalLM.from_pretrained(os.path.join(".", "base"))
    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="soft")
    model = MoLoRAModel.from_lora_adapters(relative, paths, cfg)  # recorded: the absolute path of the same folder
    assert len(model.molora_layers()) == 2


def test_train_prints_the_loss_then_export_measures_fidelity_on_the_run_eval_data(tmp_path, capsys):
    extra = {
        "train.max_steps": 2,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.export": "false",
    }
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", extra)]) == 0
    out = capsys.readouterr().out
    assert "step 1/2 | loss " in out and "step 2/2 | loss " in out
    args = [
        "export",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "v"),
        "--weights",
        "measured",
        "--target",
        "vllm",
        "--rank",
        "auto",
        "--tolerance",
        "0.2",
        "--fidelity-batches",
        "1",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "fidelity of the static merge" in out and "vllm serve" in out
    fid = json.loads((tmp_path / "v" / "merge_report.json").read_text())["fidelity"]
    assert set(fid["tasks"]) == {"reverse", "sort"} and fid["batches"] == 2 and fid["loss_routed"] > 0
