"""Run configs: YAML + dotted overrides -> validated dataclasses; every config in configs/ loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from molora.training.run_config import (
    MISSING,
    RunConfigError,
    load_run_config,
    parse_overrides,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _missing_keys(error: RunConfigError) -> list[str]:
    return re.findall(r"missing required value '([^']+)'", str(error))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    if raw.get("kind") == "demo" or "model" not in raw:
        pytest.skip(f"{path.name} uses another schema (kind={raw.get('kind')!r})")
    try:
        config = load_run_config(path)
    except RunConfigError as e:
        missing = _missing_keys(e)
        # The only acceptable problems are the ??? values a user must give.
        assert missing and len(missing) == str(e).count("missing required value"), str(e)
        assert all(line.startswith("missing required value") for line in str(e).removeprefix("invalid run config:").replace("\n  - ", "\n").strip().splitlines()), str(e)
        config = load_run_config(path, [f"{k}=/some/path" for k in missing])
    assert config.data.tasks and config.train.max_steps >= 1
    assert config.molora.num_experts >= 1


def test_required_base_model_path_fails_clearly():
    path = next(p for p in CONFIGS if p.name == "llama_instruct.yaml")
    with pytest.raises(RunConfigError, match=r"missing required value 'model\.name_or_path'.*model\.name_or_path=") as e:
        load_run_config(path, ["data.tasks.qa.train=a.jsonl", "data.tasks.code.train=b.jsonl"])
    assert MISSING in str(e.value)


def test_tiny_config_resolves_data_paths_next_to_the_file(tiny_config_path):
    config = load_run_config(tiny_config_path)
    assert list(config.data.tasks) == ["reverse", "sort"]
    for spec in config.data.tasks.values():
        assert Path(spec.train).is_file() and Path(spec.eval).is_file()
    assert config.model.from_config["model_type"] == "llama"


def test_override_paths_are_relative_to_cwd(tiny_config_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_run_config(tiny_config_path, ["data.tasks.sort.train=mine.jsonl"])
    assert config.data.tasks["sort"].train == str(tmp_path / "mine.jsonl")
    assert config.data.tasks["reverse"].train.startswith(str(tiny_config_path.parent))


def test_overrides_are_parsed_as_yaml(tiny_config_path):
    config = load_run_config(
        tiny_config_path,
        ["molora.num_experts=3", "molora.target_modules=[q_proj, v_proj]", "train.lr=1e-4", "train.max_grad_norm=null", "train.warmup=0.1"],
    )
    assert config.molora.num_experts == 3
    assert config.molora.target_modules == ["q_proj", "v_proj"]
    assert config.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: converted
    assert config.train.max_grad_norm is None
    assert config.train.warmup == pytest.approx(0.1)


def test_unknown_key_names_it_and_lists_known(tiny_config_path):
    with pytest.raises(RunConfigError, match=r"unknown key 'train\.lrr'; known: \[.*'lr'.*\]"):
        load_run_config(tiny_config_path, ["train.lrr=0.1"])
    with pytest.raises(RunConfigError, match=r"unknown key 'molora\.num_expert'"):
        load_run_config(tiny_config_path, ["molora.num_expert=2"])
    with pytest.raises(RunConfigError, match=r"unknown key 'optim'"):
        load_run_config(tiny_config_path, ["optim.lr=1"])
    with pytest.raises(RunConfigError, match=r"unknown key 'data\.tasks\.sort\.column'"):
        load_run_config(tiny_config_path, ["data.tasks.sort.column=x"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.mixed_precision=fp8", r"'train\.mixed_precision' must be one of \['auto', 'bf16', 'fp16', 'no'\], got 'fp8'"),
        ("train.lr=abc", r"'train\.lr' must be a number, got 'abc'"),
        ("train.lr=-1", r"'train\.lr' must be a number > 0, got -1"),
        ("train.batch_size=0", r"'train\.batch_size' must be >= 1, got 0"),
        ("train.batch_size=2.5", r"'train\.batch_size' must be an int, got 2\.5"),
        ("train.warmup=1.5", r"'train\.warmup' must be >= 0 steps .* got 1\.5"),
        ("train.progress_bar=maybe", r"'train\.progress_bar' must be true/false, got 'maybe'"),
        ("molora.top_k=9", r"molora: molora.top_k must be in \[1, molora.num_experts=4\], got 9"),
        ("molora.router=moe", r"molora: molora.router must be one of"),
        ("data.mixing=random", r"'data\.mixing' must be one of \['equal', 'size', 'temperature'\], got 'random'"),
        ("model.task_type=seq2seq", r"'model\.task_type' must be one of"),
        ("molora.num_tasks=0", r"molora.num_tasks must be an int >= 1"),
        ("train.router_lr_ratio=0", r"'train\.router_lr_ratio' must be a number > 0 or null, got 0"),
        ("model.from_adapters=[a, b]", r"'molora\.num_experts' must equal the number of model\.from_adapters \(2\), got 4"),
        ("model.from_adapters={reverse: a, other: b}", r"'model\.from_adapters' as a mapping needs one adapter per data\.tasks name \['reverse', 'sort'\]"),
        ("model.from_adapters=3", r"'model\.from_adapters' must be"),
    ],
)
def test_bad_values_name_key_and_value(tiny_config_path, override, pattern):
    with pytest.raises(RunConfigError, match=pattern):
        load_run_config(tiny_config_path, [override])


def test_all_problems_are_reported_at_once(tiny_config_path):
    with pytest.raises(RunConfigError) as e:
        load_run_config(tiny_config_path, ["train.lrr=1", "train.batch_size=x", "molora.bad=1"])
    message = str(e.value)
    assert "train.lrr" in message and "train.batch_size" in message and "molora.bad" in message


def test_task_router_needs_one_task_id_per_task(tiny_config_path):
    config = load_run_config(tiny_config_path, ["molora.router=task", "molora.num_tasks=2", "molora.top_k=null"])
    assert config.molora.router == "task"
    inferred = load_run_config(tiny_config_path, ["molora.router=task", "molora.top_k=null"])  # from data.tasks
    assert inferred.molora.num_tasks == 2 and inferred.molora.task_names == ["reverse", "sort"]
    assert load_run_config(tiny_config_path).molora.task_names == ["reverse", "sort"]  # task ids by name
    with pytest.raises(RunConfigError, match=r"'molora\.num_tasks' must equal the number of data\.tasks \(2"):
        load_run_config(tiny_config_path, ["molora.router=task", "molora.num_tasks=3", "molora.top_k=null"])


def test_model_needs_path_or_from_config(tiny_config_path):
    with pytest.raises(RunConfigError, match=r"exactly one of 'model\.name_or_path'"):
        load_run_config(tiny_config_path, ["model.name_or_path=/x"])


def test_bad_override_syntax():
    with pytest.raises(RunConfigError, match=r"dotted\.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(RunConfigError, match=r"dotted\.key=value"):
        parse_overrides(["train..lr=1"])


def test_to_yaml_round_trips(tiny_config_path, tmp_path):
    config = load_run_config(tiny_config_path, ["train.max_steps=3"])
    saved = tmp_path / "run_config.yaml"
    saved.write_text(config.to_yaml())
    again = load_run_config(saved)
    assert again.to_dict() == config.to_dict()


def test_cli_rejects_bad_key_before_loading_any_model(tiny_config_path, monkeypatch, capsys):
    import molora.training.loop
    from molora.cli import main

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(molora.training.loop, "load_base_model", fail)
    monkeypatch.setattr(molora.training.loop, "train", fail)
    assert main(["train", str(tiny_config_path), "train.lrr=0.1"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err


def test_cli_dry_run_prints_resolved_config(tiny_config_path, capsys):
    from molora.cli import main

    assert main(["train", str(tiny_config_path), "molora.num_experts=2", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["molora"]["num_experts"] == 2
    assert set(printed) == {"model", "molora", "data", "train"}


def test_missing_data_file_fails_before_model_load(tiny_config_path, tmp_path, monkeypatch):
    import molora.training.loop

    monkeypatch.setattr(molora.training.loop, "load_base_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    config = load_run_config(tiny_config_path, [f"data.tasks.sort.train={tmp_path / 'nope.jsonl'}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.tasks\.sort\.train="):
        molora.training.loop.train(config)


@pytest.mark.parametrize("position", [0, 1, 3])
def test_cli_flags_may_come_anywhere_among_overrides(tiny_config_path, capsys, position):
    from molora.cli import main

    argv = [str(tiny_config_path), "molora.num_experts=2", "train.max_steps=7"]
    argv.insert(position, "--dry-run")
    assert main(["train", *argv]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["molora"]["num_experts"] == 2 and printed["train"]["max_steps"] == 7


def test_cli_rejects_unknown_and_conflicting_flags(tiny_config_path, capsys):
    from molora.cli import main

    assert main(["train", str(tiny_config_path), "train.max_steps=7", "--bogus"]) == 2
    assert "unrecognized options ['--bogus']" in capsys.readouterr().err
    assert main(["train", str(tiny_config_path), "--resume", "--resume-from", "x"]) == 2
    assert "not both" in capsys.readouterr().err


def test_task_shorthand_takes_nested_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {from_config: {model_type: llama}, tokenizer: byte}\n"
        "data: {tasks: {a: a.jsonl, b: {train: b.jsonl}}}\n"
    )
    config = load_run_config(path, ["data.tasks.a.eval=ae.jsonl"])
    assert config.data.tasks["a"].train == str(tmp_path / "a.jsonl")
    assert config.data.tasks["a"].eval == str(Path.cwd() / "ae.jsonl")
    assert config.data.tasks["b"].eval is None


def test_router_defaults_resolve_per_router_kind(tiny_config_path, tmp_path, monkeypatch):
    """No router lr and no balancing coefficient of the user's own: null in the resolved config
    (the optimizer applies the router kind's ratio) and the kind's coefficient in `molora`."""
    from molora.core.recipes import AUX_LOSS_COEF

    config = load_run_config(tiny_config_path, ["molora.router=task", "molora.top_k=null"])
    assert config.train.router_lr is None and config.train.router_lr_ratio is None
    assert config.molora.router_aux_loss_coef == AUX_LOSS_COEF["task"] == 0.0
    assert load_run_config(tiny_config_path).molora.router_aux_loss_coef == AUX_LOSS_COEF["topk"]
    monkeypatch.chdir(tmp_path)
    adapters = load_run_config(tiny_config_path, ["molora.num_experts=2", "model.from_adapters=[a, b]"]).model.from_adapters
    assert adapters == [str(tmp_path / "a"), str(tmp_path / "b")]  # from the command line: relative to the cwd
