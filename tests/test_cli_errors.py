"""Every CLI error names the command line's own flags, never the Python API's arguments or calls
(`molora export RUN --task all` on a top-k run says `--weights measured`, not `measure_gates(...)`)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_CONFIG
from tiny_models import random_batch, tiny_llama, train_steps

from molora import MoLoRAConfig, get_molora_model
from molora.apps.cli import main

# What a Python-API message looks like: a backticked argument, a call, a keyword argument.
PYTHON_SPELLING = re.compile(r"`\w+|\w+\((model|batches)|\b(task|rank|method|target|weights|tolerance)=\S")


@pytest.fixture(scope="module")
def topk_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    tiny_llama().save_pretrained(root / "base")
    from transformers import AutoModelForCausalLM

    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, r=2, router="topk", top_k=2)
    model = get_molora_model(AutoModelForCausalLM.from_pretrained(root / "base"), cfg)
    train_steps(model, random_batch())
    model.save_pretrained(root / "adapter")
    return root


CASES = {  # flags -> what the message must name
    "task_all_on_topk": (["--task", "all"], "--weights measured"),
    "one_task_on_topk": (["--task", "1"], "--weights measured"),
    "svd_rank_too_big": (["--method", "svd", "--rank", "999"], "--method cat"),
    "rank_with_cat": (["--rank", "4"], "--rank applies to --method svd only"),
    "measured_without_eval": (["--weights", "measured"], "--weights FILE"),
    "merge_all_tasks": (["--merge-into-base", "--task", "all"], "--merge-into-base takes one --task"),
    "merge_with_svd": (["--merge-into-base", "--method", "svd"], "--merge-into-base"),
    "bad_weights": (["--weights", "sideways"], "--weights must be"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_errors_name_the_cli_flags(topk_adapter, case, capsys):
    flags, expected = CASES[case]
    out = topk_adapter / f"out_{case}"
    assert main(["export", str(topk_adapter / "adapter"), "--out", str(out), "--no-progress", *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("molora export: error:")]
    assert len(err) == 1 and expected in err[0], err
    assert not PYTHON_SPELLING.search(err[0]), err[0]


def test_train_config_errors_name_the_run_config_keys(tmp_path, capsys):
    args = ["train", str(TINY_CONFIG), f"train.output_dir={tmp_path / 'run'}", "molora.top_k=99", "--dry-run"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "molora.top_k must be in [1, molora.num_experts=4], got 99" in err, err
    assert not PYTHON_SPELLING.search(err), err


def test_export_prints_how_to_merge_a_quantized_export(tmp_path, capsys):
    from molora.apps.commands.export import print_export
    from molora.merge.quantized import merge_note

    layers = {"model.layers.0.self_attn.q_proj": {"rank": 4, "rel_error": 0.0, "weights": [1.0]}}
    report = {"method": "cat", "rank": None, "target": "peft", "layers": layers}
    report["quantized_base"] = {"kind": "4-bit", "merge": merge_note("4-bit")}
    print_export(report, tmp_path, task=0)
    out = capsys.readouterr().out
    assert "PEFT's merge_and_unload() on the 4-bit base keeps the layers 4-bit" in out and "--merge-into-base" in out


def test_dora_vllm_refusal_names_the_cli_way_to_merge(tmp_path, capsys):
    """The library's advice, merge_and_unload(task=...), is a Python call; the CLI names its flags."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router="task", num_tasks=2, use_dora=True)
    model = get_molora_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), cfg)
    train_steps(model, random_batch(), task_ids=torch.tensor([0, 1]))
    model.save_pretrained(tmp_path / "adapter")
    args = ["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"), "--task", "all", "--target", "vllm"]
    assert main([*args, "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("molora export: error:")]
    assert len(err) == 1 and "--task T --merge-into-base" in err[0], err
    assert not PYTHON_SPELLING.search(err[0]) and "merge_and_unload" not in err[0], err[0]
