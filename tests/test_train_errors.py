"""`molora train` on bad input: one line naming the file, line or field, exit 2; a traceback
only with --debug. Data without a supervised token fails before training; a micro-batch without
one contributes nothing."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides

from molora.cli import main

QUICK = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 0, "train.export": "false"}


def _train(tmp_path: Path, *args: str, **extra) -> list[str]:
    return ["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "run", {**QUICK, **extra}), *args]


def _last_line(err: str) -> str:
    """The last line of stderr (progress bars come before it, with carriage returns)."""
    return err.strip().splitlines()[-1].split("\r")[-1]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_ROWS = {
    "malformed": ('{"prompt": "ab", "response": "ba"}\n{bad json\n', r"bad\.jsonl', line 2: not valid JSON"),
    "empty": ("", r"empty\.jsonl' has no rows"),
    "null": ('{"prompt": "ab", "response": "ba"}\nnull\n', r"null\.jsonl', line 2: expected a JSON object"),
    "nullfield": (
        '{"prompt": "ab", "response": null}\n',
        r"nullfield\.jsonl'.*row 1: column 'response' must be a string",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_jsonl_rows_name_the_file_and_line(tmp_path, capsys, kind):
    text, message = BAD_ROWS[kind]
    name = {"malformed": "bad"}.get(kind, kind)
    data = _write(tmp_path / f"{name}.jsonl", text)
    assert main(_train(tmp_path, **{"data.tasks.reverse.train": data})) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search("^molora train: error: .*" + message, _last_line(err)), err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"molora.target_modules": "[q_projj]"}, "matched no module"),
        ({"train.batch_size": 1000}, "fewer than train.batch_size=1000"),
        ({"model.from_config.model_type": "llamaa"}, "model.from_config.model_type='llamaa' is not a transformers"),
        ({"model.from_config.vocab_size": 100}, "model.from_config.vocab_size=100 is smaller than the tokenizer's 259"),
        ({"data.max_length": 4}, "data.tasks.reverse.train=.*no example keeps a supervised token.*data.max_length=4"),
    ],
    ids=["target-typo", "batch-too-large", "model-type", "vocab", "truncated"],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(_train(tmp_path, **extra)) == 2
    err = capsys.readouterr().err
    assert re.search("^molora train: error: .*" + message, _last_line(err)), err
    assert "Traceback" not in err and not (tmp_path / "run" / "summary.json").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="matched no module"):
        main(_train(tmp_path, "--debug", **{"molora.target_modules": "[q_projj]"}))


def test_a_bug_is_not_hidden_as_a_user_error(tmp_path, monkeypatch):
    import molora.training.loop as loop

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "train", broken)
    with pytest.raises(KeyError):
        main(_train(tmp_path))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    assert main(["train", str(TINY_CONFIG), *tiny_run_overrides(root, "run", QUICK)]) == 0
    return root


def _resume(root: Path, tmp_path: Path, name: str, damage=None, **extra) -> list[str]:
    run = tmp_path / name
    shutil.copytree(root / "run", run)
    if damage:
        damage(run / "checkpoints" / "step_0000002")
    values = {**QUICK, "train.output_dir": str(run), "data.cache_dir": str(root / "ds_cache"), **extra}
    return ["train", str(TINY_CONFIG), *tiny_run_overrides(tmp_path, "unused", values), "--resume"]


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        (None, {"molora.r": 8}, r"molora config differs .*'r': \(4, 8\)"),
        (None, {"train.max_steps": 1}, r"at step 2 > train.max_steps=1; set train.max_steps >= 2"),
        (
            lambda c: (c / "optimizer.pt").write_bytes(b"PK\x03\x04"),
            {"train.max_steps": 3},
            r"optimizer\.pt' is damaged",
        ),
        (
            lambda c: (c / "trainer_state.json").write_text('{"step": 2'),
            {"train.max_steps": 3},
            r"trainer_state\.json' is damaged",
        ),
    ],
    ids=["config-mismatch", "beyond-max-steps", "corrupt-optimizer", "corrupt-state"],
)
def test_resume_errors_name_the_checkpoint(finished, tmp_path, capsys, damage, extra, message):
    assert main(_resume(finished, tmp_path, "r", damage, **extra)) == 2
    err = capsys.readouterr().err
    assert re.search("^molora train: error: --resume.*" + message, _last_line(err)), err


def test_a_micro_batch_without_a_target_contributes_nothing(tmp_path):
    """Half the examples lose every target to max_length: some micro-batches have none."""
    rows = []
    for i in range(16):
        prompt = "p" * (40 if i % 2 else 3)  # 40 > max_length=32: no response token survives
        rows.append(json.dumps({"prompt": prompt, "response": "abc"}))
    data = _write(tmp_path / "half.jsonl", "\n".join(rows) + "\n")
    extra = {"data.tasks": "null", "data.tasks.half.train": data, "data.tasks.half.eval": data}
    extra |= {"train.batch_size": 1, "train.grad_accum": 1, "train.max_steps": 4, "train.eval_every": 2}
    extra |= {"molora.router": "soft", "molora.top_k": "null"}
    assert main(_train(tmp_path, **extra)) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert any(r["targets"] == 0 for r in train) and any(r["targets"] > 0 for r in train)
    for r in train:  # no NaN, no loss on 0 targets
        assert (r["loss"] is None) == (r["targets"] == 0) and (r["loss"] is None or math.isfinite(r["loss"]))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert math.isfinite(summary["final_train_loss"])
    assert all(math.isfinite(m["loss"]) for m in summary["final_eval"].values())
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "final" / "molora_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_micro_batch_loss_of_a_batch_without_targets_is_zero_with_zero_gradient():
    from tiny_models import tiny_llama

    from molora import MoLoRAConfig, get_molora_model
    from molora.training.objective import micro_batch_loss

    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2))
    ids = torch.randint(3, 100, (2, 6))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    loss, stats = micro_batch_loss(model, model, batch, causal=True, step_targets=torch.tensor(0), grad_accum=1)
    loss.backward()
    assert stats[0].item() == 0 and stats[1].item() == 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_a_target_module_typo_fails_before_the_base_model_is_written(tmp_path):
    assert main(_train(tmp_path, **{"molora.target_modules": "[q_projj]"})) == 2
    assert not (tmp_path / "run" / "base_model").exists()
