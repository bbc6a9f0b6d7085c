"""A training run survives kills and leftovers: checkpoints replaced as one unit, temporary
folders and a partial metrics line ignored by --resume and inspect, the last step checkpointed,
usual file modes, exports that keep the user's files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides
from tiny_models import tiny_llama

from molora.cli import main

STEPS = 4


def _overrides(root: Path, out: str, extra: dict | None = None) -> list[str]:
    values = {"train.max_steps": STEPS, "train.save_every": 2, "train.eval_every": 2, "data.num_samples": 16}
    return tiny_run_overrides(root, out, {**values, **(extra or {})})


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("reliable")
    old = os.umask(0o022)
    try:
        assert main(["train", str(TINY_CONFIG), *_overrides(root, "run")]) == 0
    finally:
        os.umask(old)
    return root / "run"


def _steps(run: Path, kind: str = "train") -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_last_step_is_checkpointed_and_a_finished_run_resumes_with_more_steps(run4, tmp_path):
    assert (run4 / "checkpoints" / "step_0000004" / "trainer_state.json").is_file()
    more = tmp_path / "more"
    shutil.copytree(run4, more)
    extra = {"train.output_dir": str(more), "data.cache_dir": str(run4.parent / "ds_cache"), "train.max_steps": 6}
    assert main(["train", str(TINY_CONFIG), "--resume", *_overrides(tmp_path, "unused", extra)]) == 0
    assert _steps(more) == [1, 2, 3, 4, 5, 6]
    assert json.loads((more / "summary.json").read_text())["steps"] == 6


def test_save_every_beyond_max_steps_still_leaves_a_checkpoint(tmp_path):
    extra = {"train.max_steps": 2, "train.save_every": 100, "train.eval_every": 0, "train.export": "false"}
    assert main(["train", str(TINY_CONFIG), *_overrides(tmp_path, "r", extra)]) == 0
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_0000002"]


def test_resume_ignores_temporary_checkpoint_folders_and_a_partial_metrics_line(run4, tmp_path, capsys):
    run = tmp_path / "killed"
    shutil.copytree(run4, run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    shutil.rmtree(run / "final")
    # leftovers of interrupted saves: the old `step_N.tmp` layout (state written, rename not
    # done) and a hidden temporary folder of the atomic writer
    for name in ("step_0000015.tmp", ".step_0000016.molora-tmp-x1y2"):
        shutil.copytree(run4 / "checkpoints" / "step_0000002", run / "checkpoints" / name)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 5, "lo')  # killed mid-line
    assert main(["inspect", str(run), "--no-plots"]) == 0
    assert "checkpoints: step_0000002" in capsys.readouterr().out
    extra = {"train.output_dir": str(run), "data.cache_dir": str(run4.parent / "ds_cache")}
    assert main(["train", str(TINY_CONFIG), "--resume", *_overrides(tmp_path, "unused", extra)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _steps(run) == [1, 2, 3, 4]
    # the next save removed the leftovers
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_inspect_names_a_corrupt_line_before_the_last(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n{oops\n{"type": "train"}\n')
    assert main(["inspect", str(tmp_path), "--no-plots"]) == 2
    assert "metrics.jsonl:2: not a JSON record" in capsys.readouterr().err


def _unusual_modes(paths) -> list[tuple[str, str]]:
    modes = [(p, stat.S_IMODE(p.stat().st_mode)) for p in paths]
    return [(str(p), oct(m)) for p, m in modes if m != (0o755 if p.is_dir() else 0o644)]


def test_run_files_have_the_usual_modes(run4):
    assert _unusual_modes(p for p in [run4, *run4.rglob("*")] if "export" not in p.parts) == []


def test_export_files_have_the_usual_modes(run4):
    assert _unusual_modes((run4 / "export").rglob("*")) == []


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


class _Killed(BaseException):
    """A kill: raised at the chosen call, and by every file operation after it."""


def _kill_at(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th file operation (and every later one) raise ``_Killed``; returns the call counter."""
    calls = [0]

    def wrap(fn):
        def killed(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= n:
                raise _Killed
            return fn(*args, **kwargs)

        return killed

    import molora.atomic as atomic

    for owner, name in [(os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree"), (torch, "save")]:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))
    monkeypatch.setattr(atomic, "_exchange", wrap(atomic._exchange))
    return calls


def test_checkpoint_is_the_old_or_the_new_one_whenever_the_save_is_killed(tmp_path, monkeypatch):
    from molora import MoLoRAConfig, get_molora_model
    from molora.training.checkpoints import save_checkpoint
    from molora.training.distributed import make_accelerator
    from molora.training.run_dir import checkpoint_dirs

    accelerator = make_accelerator("no")
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(out: Path, tag: str) -> None:
        save_checkpoint(accelerator, model, optimizer, scheduler, {"step": 3, "tag": tag}, out, keep=None)

    save(tmp_path / "ref", "old")
    n, killed = 1, True
    while killed:
        out = tmp_path / f"kill{n}"
        shutil.copytree(tmp_path / "ref", out)
        with monkeypatch.context() as m:
            calls = _kill_at(m, n)
            try:
                save(out, "new")
                killed = False
            except _Killed:
                pass
        (ckpt,) = checkpoint_dirs(out)  # never none, never a mix: all files, and the old or the new state
        assert _tree(ckpt) == _tree(tmp_path / "ref" / "checkpoints" / "step_0000003"), n
        tag = json.loads((ckpt / "trainer_state.json").read_text())["tag"]
        assert tag == "new" if not killed else tag in ("old", "new"), n
        save(out, "again")  # the next save cleans up
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000003"], n
        n += 1
    assert n > 3 and calls[0] >= 3


def test_export_over_a_previous_export_keeps_the_users_files(run4, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(run4), "--out", str(out), "--no-progress"]) == 0
    (out / "README.md").write_text("my notes\n")
    (out / "eval").mkdir()
    (out / "eval" / "scores.txt").write_text("0.9\n")
    assert main(["export", str(run4), "--out", str(out), "--method", "svd", "--rank", "2", "--no-progress"]) == 0
    assert (out / "README.md").read_text() == "my notes\n" and (out / "eval" / "scores.txt").read_text() == "0.9\n"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_of_a_token_routed_model_says_routing_is_approximated(run4, tmp_path, capsys):
    assert main(["export", str(run4), "--out", str(tmp_path / "m"), "--weights", "measured", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "max rel. error 0.000e+00 (of the factorization of the static merge)" in out
    assert "router='topk'" in out and "only approximate token routing" in out


def test_task_router_export_of_one_task_has_no_routing_note():
    from molora.apps.commands.export import routing_note

    assert routing_note("task", 0) is None
    assert "approximate" in routing_note("soft", None) and "approximate" in routing_note("topk", 1)


def test_export_names_a_weights_file_that_is_not_json(run4, tmp_path, capsys):
    bad = tmp_path / "gates.json"
    bad.write_text("not json")
    assert main(["export", str(run4), "--out", str(tmp_path / "o"), "--weights", str(bad), "--no-progress"]) == 2
    assert f"--weights {str(bad)!r} is not a readable gates file" in capsys.readouterr().err


def test_export_names_a_null_config_entry(run4, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(run4 / "final", adapter)
    meta = json.loads((adapter / "molora_config.json").read_text())
    (adapter / "molora_config.json").write_text(json.dumps({**meta, "config": None}))
    assert main(["export", str(adapter), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "molora_config.json: 'config' must be a JSON object, got null" in capsys.readouterr().err


def test_routing_plot_shows_gate_weights_for_dense_routers_and_load_for_sparse():
    from molora.apps.plots import routing_quantity

    dense = {"l0": {"load": [1.0, 1.0], "gates": [0.7, 0.3]}}
    sparse = {"l0": {"load": [1.5, 0.5], "gates": [0.7, 0.3]}}
    assert routing_quantity("soft", dense) == ("gates", "mean gate weight per token")
    assert routing_quantity("task", dense)[0] == "gates" and routing_quantity(None, dense)[0] == "gates"
    assert routing_quantity("topk", sparse)[0] == "load" and routing_quantity(None, sparse)[0] == "load"


def test_inspect_plots_mean_gate_weight_of_a_soft_router(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from molora.apps import plots

    seen = {}
    real = plots.plot_routing

    def spy(routing, path, *, title="", router=None):
        seen.update(router=router, title=title)
        return real(routing, path, title=title, router=router)

    monkeypatch.setattr(plots, "plot_routing", spy)
    run = tmp_path / "soft"
    run.mkdir()
    record = {"type": "eval", "step": 1, "tasks": {"a": {"loss": 1.0, "accuracy": 0.5, "examples": 2, "tokens": 4}}}
    record["routing"] = {"a": {"l0": {"load": [1.0, 1.0], "gates": [0.9, 0.1], "tokens": 4}}}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run / "run_config.yaml").write_text("molora:\n  router: soft\n")
    assert main(["inspect", str(run)]) == 0
    assert seen["router"] == "soft" and "mean gate weight" in seen["title"]
