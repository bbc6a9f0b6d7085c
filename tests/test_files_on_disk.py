"""Files the user owns and runs shared between processes (issue 17): the writer lock, readers
that never break a save, exports that own only what they wrote, symlinks, modes, read-only
folders, a full disk, and the recovery after a kill between the fallback swap's two renames."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run_overrides
from tampering import locked_by_another_process, small_disk
from tiny_models import random_batch, tiny_llama, train_steps

import molora.atomic as atomic
from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.atomic import DiskFullError, FolderBusyError, IncompleteSaveError
from molora.cli import main


def trained(task_names=None) -> MoLoRAModel:
    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router="task", num_tasks=2,
                       task_names=task_names)
    model = get_molora_model(tiny_llama(), cfg)
    train_steps(model, random_batch(), task_ids=torch.tensor([0, 1]))
    return model


def _state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _kill_between_renames(monkeypatch, save) -> None:
    """Run ``save`` with the fallback swap and die right after the old folder is moved aside."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        if str(dst).endswith("previous"):
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        save()
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    monkeypatch.undo()


# item 1 -----------------------------------------------------------------------------------------


def test_a_reader_during_a_save_never_deletes_the_save_in_progress(tmp_path, monkeypatch):
    """A load ran the recovery that deleted every temporary folder, the running save's too: the
    save then published a folder without weights over the old adapter and reported success."""
    model, path = trained(), tmp_path / "a"
    model.save_pretrained(path)
    real_write = atomic.atomic_write_text

    def read_then_write(target, text):  # another reader loads the adapter in mid-save
        MoLoRAModel.from_pretrained(tiny_llama(), path)
        real_write(target, text)

    monkeypatch.setattr("molora.io.atomic_write_text", read_then_write)
    with torch.no_grad():
        next(iter(model.molora_layers().values())).lora_B.add_(1.0)
    model.save_pretrained(path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["molora_config.json", "molora_model.safetensors"]
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), path)
    name = next(iter(model.molora_layers()))
    torch.testing.assert_close(loaded.molora_layers()[name].lora_B, model.molora_layers()[name].lora_B)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folder, no lock file left


def test_a_second_writer_is_told_another_process_is_writing(tmp_path):
    model, path = trained(), tmp_path / "a"
    model.save_pretrained(path)
    before = _state(path)
    with locked_by_another_process(path) as pid:
        with pytest.raises(FolderBusyError, match=rf"another process \(pid {pid} .*is writing"):
            model.save_pretrained(path)
        assert MoLoRAModel.from_pretrained(tiny_llama(), path) is not None  # readers still read
    assert _state(path) == before


def test_a_save_checks_what_it_publishes(tmp_path, monkeypatch):
    model, path = trained(), tmp_path / "a"
    model.save_pretrained(path)
    before = _state(path)
    monkeypatch.setattr("molora.io.atomic_save_safetensors", lambda tensors, p, metadata=None: Path(p).write_bytes(b""))
    with pytest.raises(IncompleteSaveError, match="molora_model.safetensors is empty"):
        model.save_pretrained(path)
    assert _state(path) == before


# item 11, 22 -------------------------------------------------------------------------------------


def test_saving_through_a_symlink_saves_into_its_target(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "target")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with torch.no_grad():
        next(iter(model.molora_layers().values())).lora_B.add_(1.0)
    model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    name = next(iter(model.molora_layers()))
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), tmp_path / "target")
    torch.testing.assert_close(loaded.molora_layers()[name].lora_B, model.molora_layers()[name].lora_B)


def test_a_resave_keeps_a_private_folders_modes(tmp_path):
    model, path = trained(), tmp_path / "a"
    model.save_pretrained(path)
    os.chmod(path, 0o700)
    for f in path.iterdir():
        os.chmod(f, 0o600)
    model.save_pretrained(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {
        "molora_config.json": 0o600, "molora_model.safetensors": 0o600}
    model.export_merged_adapter(tmp_path / "e", task=0)
    os.chmod(tmp_path / "e", 0o700)
    model.export_merged_adapter(tmp_path / "e", task="all")  # new entries in a private folder stay private
    new = [p for p in (tmp_path / "e").rglob("*") if p.parent.name.startswith("task_") or p.name.startswith("task_")]
    assert len(new) == 8 and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in new)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o700


# items 3, 4 ---------------------------------------------------------------------------------------


def test_a_reexport_keeps_the_users_own_peft_adapter_folder(tmp_path):
    model, out = trained(), tmp_path / "export"
    model.export_merged_adapter(out, task="all")
    mine = out / "my_lora"
    (out / "task_0").rename(mine)  # the user's own PEFT adapter, kept beside the export
    (mine / "merge_report.json").unlink()
    model.export_merged_adapter(out, task="all")
    assert (mine / "adapter_config.json").is_file() and (mine / "adapter_model.safetensors").is_file()
    assert {"task_0", "task_1", "my_lora"} <= {p.name for p in out.iterdir()}


def test_a_task_named_like_a_users_file_is_refused(tmp_path):
    out = tmp_path / "export"
    trained().export_merged_adapter(out, task="all")
    (out / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="README.md"):
        trained(task_names=["README.md", "b"]).export_merged_adapter(out, task="all")
    assert (out / "README.md").read_text() == "my notes"


# item 2 ----------------------------------------------------------------------------------------------


def _run_with_kept_base(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder holding its base in base_model/ and its adapter in final/."""
    run, base = tmp_path / "run", tmp_path / "run" / "base_model"
    tiny_llama().save_pretrained(base)
    (base / "NOTES.md").write_text("the user's file")
    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="task", num_tasks=2)
    model = get_molora_model(type(tiny_llama()).from_pretrained(base), cfg)
    train_steps(model, random_batch(), task_ids=torch.tensor([0, 1]))
    model.save_pretrained(run / "final")
    return run, base


def test_merge_into_base_refuses_the_base_folder(tmp_path, capsys):
    run, base = _run_with_kept_base(tmp_path)
    (tmp_path / "link").symlink_to(base)
    before = _state(base)
    for out in (base, tmp_path / "link", run):
        code = main(["export", str(run), "--task", "0", "--merge-into-base", "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "base model folder" in err and "Traceback" not in err, (out, err)
        assert _state(base) == before


# item 12 ---------------------------------------------------------------------------------------------


def test_inspect_and_export_recover_a_kill_between_the_renames(tmp_path, monkeypatch, capsys):
    from molora.apps.commands.export import find_adapter_dir

    model, run = trained(), tmp_path / "run"
    model.save_pretrained(run / "final")
    model.save_pretrained(run / "checkpoints" / "step_0000002" / "adapter")
    (run / "checkpoints" / "step_0000002" / "trainer_state.json").write_text('{"step": 2}')
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0}) + "\n")
    _kill_between_renames(monkeypatch, lambda: model.save_pretrained(run / "final"))
    ckpt = run / "checkpoints" / "step_0000002"

    def save_checkpoint():
        with atomic.atomic_directory(ckpt) as tmp:
            model.save_pretrained(tmp / "adapter")
            (tmp / "trainer_state.json").write_text('{"step": 2}')

    _kill_between_renames(monkeypatch, save_checkpoint)
    assert not (run / "final").exists() and not ckpt.exists()
    assert main(["inspect", str(run / "final")]) == 0  # the adapter is put back, not "nothing here"
    assert main(["inspect", str(run), "--no-plots"]) == 0
    assert "checkpoints: step_0000002" in capsys.readouterr().out
    assert find_adapter_dir(run) == run / "final"


def test_export_never_looks_inside_hidden_temporary_folders(tmp_path, capsys):
    run = tmp_path / "run"
    trained().save_pretrained(run / ".final.molora-tmp-killed")  # a save killed before its swap
    code = main(["export", str(run), "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no MoLoRA adapter" in err and ".molora-tmp" not in err


# item 17 ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` read-only: a read-only bind mount as root (chmod does not stop root), else chmod."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            os.chmod(p, stat.S_IMODE(modes[p]) & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                os.chmod(p, stat.S_IMODE(mode))
        return
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount (needed to make a folder read-only for root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only")
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_inspect_of_a_read_only_run_writes_its_plots_elsewhere(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    records = [{"type": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with _read_only(run):
        assert main(["inspect", str(run)]) == 0
    captured = capsys.readouterr()
    assert "cannot write plots into" in captured.err and "Traceback" not in captured.err
    written = Path(captured.out.split("wrote ")[-1].strip())
    assert written.is_file() and written.parent != run and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


# item 16 --------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled up (root only; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    with small_disk(tmp_path, "1m") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here")
        yield disk


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_files(full_disk, tmp_path, capsys):
    disk, fill = full_disk
    model = trained()
    model.save_pretrained(disk / "a")
    model.export_merged_adapter(disk / "e")
    before, before_export = _state(disk / "a"), _state(disk / "e")
    fill()
    with pytest.raises(DiskFullError, match="is full"):
        model.save_pretrained(disk / "a")
    model.save_pretrained(tmp_path / "src")
    code = main(["export", str(tmp_path / "src"), "--base", _base(tmp_path), "--out", str(disk / "e"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is full" in err and "nothing was half-written" in err and "Traceback" not in err
    assert _state(disk / "a") == before and _state(disk / "e") == before_export
    assert sorted(p.name for p in disk.iterdir()) == ["a", "e", "filler"]


def _base(tmp_path: Path) -> str:
    tiny_llama().save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


@pytest.mark.parametrize("error", ["safetensors", "torch"])
def test_the_errors_of_torch_and_safetensors_on_a_full_disk_become_one_message(tmp_path, monkeypatch, error):
    """The real exception types, raised where the writers raise them (no root needed)."""
    from safetensors import SafetensorError

    model, path = trained(), tmp_path / "a"
    model.save_pretrained(path)
    before = _state(path)
    if error == "safetensors":
        def fail(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(atomic, "save_file", fail)
    else:  # torch.save's message on a full disk names no cause: the free space tells
        def fail(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr("molora.io.atomic_save_safetensors", fail)
        monkeypatch.setattr(atomic.checks.shutil, "disk_usage", lambda p: _Usage())
    with pytest.raises(DiskFullError, match="nothing was half-written"):
        model.save_pretrained(path)
    monkeypatch.undo()
    assert _state(path) == before


class _Usage:
    total, used, free = 1 << 30, 1 << 30, 0


# item 21 --------------------------------------------------------------------------------------------


def test_a_second_train_into_the_same_output_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000003").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n')
    with locked_by_another_process(run) as pid:
        overrides = tiny_run_overrides(tmp_path, "run", {"train.overwrite_output_dir": "true"})
        assert main(["train", str(TINY_CONFIG), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"another process (pid {pid}" in err and "run folder" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step_0000003").is_dir() and (run / "metrics.jsonl").is_file()  # nothing deleted


def test_a_file_write_never_deletes_the_temp_file_of_a_live_writer(tmp_path):
    """Each file write removed every ``.{name}.molora-tmp-*``: another process writing the same
    file at the same time lost its temporary file and crashed at its rename."""
    live = tmp_path / f".x.json.molora-tmp-{os.getpid()}-abc"  # this process: alive
    dead = tmp_path / ".x.json.molora-tmp-999999999-def"  # no such process
    live.write_text("being written")
    dead.write_text("left by a kill")
    atomic.atomic_write_text(tmp_path / "x.json", "{}")
    atomic.recover_directory(tmp_path / "x.json")  # what readers run
    assert live.read_text() == "being written" and not dead.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_while_appending_metrics_is_one_clear_error(tmp_path):
    """An append to metrics.jsonl on a full disk said only "[Errno 28] No space left on device"."""
    from molora.training.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", True, keep_until=None)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(DiskFullError, match=r"metrics log '.*metrics\.jsonl' at step 7: the disk is full .*--resume"):
        log.write({"type": "train", "step": 7, "loss": 1.0})
