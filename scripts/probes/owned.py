"""Probe cases: files the user owns. Exports own only what their previous report lists, task
folders never replace a user's entry, ``--merge-into-base`` never writes over the base model,
saves go through symlinks into their targets, and a private folder stays private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from probes import case, clear_exit, expect_error, run_cli
from probes.common import base, model
from probes.fsutil import _state, tiny_llama

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model


def _named(names: list[str]) -> MoLoRAModel:
    from tiny_models import random_batch, train_steps
    import torch

    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="task", num_tasks=2, task_names=names)
    m = get_molora_model(tiny_llama(), cfg)
    train_steps(m, random_batch(), task_ids=torch.tensor([0, 1]))
    return m


def _kept(folder: Path, before: dict, ok: bool, message: str) -> tuple[bool, str]:
    kept = {k: v for k, v in _state(folder).items() if k in before} == before
    return ok and kept, message + ("" if kept else " / A USER'S FILE WAS LOST")


# --- what an export owns ----------------------------------------------------------------------------


@case("owned", "re-export beside the user's own PEFT adapter folder")
def _peft_folder(tmp: Path) -> tuple[bool, str]:
    out = tmp / "e"
    model().export_merged_adapter(out, task="all")
    (out / "task_0").rename(out / "mine")
    (out / "mine" / "merge_report.json").unlink()
    before = {k: v for k, v in _state(out).items() if k.startswith("mine")}
    model().export_merged_adapter(out, task="all")
    return _kept(out, before, True, "the user's adapter folder is kept")


def _task_refused(tmp: Path, name: str, user_entry: str | None) -> tuple[bool, str]:
    out = tmp / "e"
    model().export_merged_adapter(out, task="all")
    if user_entry:
        (out / user_entry).write_text("the user's notes")
    before = _state(out)
    ok, message = expect_error(lambda: _named([name, "b"]).export_merged_adapter(out, task="all"), name)
    return _kept(out, before, ok, message)


case("owned", "task named README.md beside the user's README.md")(lambda tmp: _task_refused(tmp, "README.md", "README.md"))
case("owned", "task named merge_report.json")(lambda tmp: _task_refused(tmp, "merge_report.json", None))
case("owned", "task named adapter_config.json")(lambda tmp: _task_refused(tmp, "adapter_config.json", None))


@case("owned", "re-export keeps the user's README")
def _readme(tmp: Path) -> tuple[bool, str]:
    out = tmp / "e"
    model().export_merged_adapter(out)
    (out / "README.md").write_text("notes")
    model().export_merged_adapter(out, task="all")
    return _kept(out, {"README.md": b"notes"}, True, "kept")


@case("owned", "export into a folder that is not an export")
def _foreign(tmp: Path) -> tuple[bool, str]:
    (tmp / "e").mkdir()
    (tmp / "e" / "data.csv").write_text("1,2")
    ok, message = expect_error(lambda: model().export_merged_adapter(tmp / "e"), "not a previous molora export")
    return _kept(tmp / "e", {"data.csv": b"1,2"}, ok, message)


@case("owned", "re-save keeps the user's files and sub-folders in an adapter folder")
def _adapter_user_files(tmp: Path) -> tuple[bool, str]:
    model().save_pretrained(tmp / "a")
    (tmp / "a" / "README.md").write_text("notes")
    (tmp / "a" / "tokenizer").mkdir()
    (tmp / "a" / "tokenizer" / "vocab.txt").write_text("a b c")
    before = {k: v for k, v in _state(tmp / "a").items() if not k.startswith("molora_")}
    model().save_pretrained(tmp / "a")
    return _kept(tmp / "a", before, True, "kept")


def _merge_into(tmp: Path, out_of) -> tuple[bool, str]:
    run = tmp / "run"
    b = Path(base(tmp))
    b.rename(run / "base_model") if (run.mkdir() or True) else None
    (run / "base_model" / "NOTES.md").write_text("the user's file")
    model().save_pretrained(run / "final")
    before = _state(run / "base_model")
    out = out_of(run)
    argv = ["export", str(run), "--base", str(run / "base_model"), "--task", "0", "--merge-into-base", "--out", str(out),
            "--no-progress"]
    ok, message = clear_exit(run_cli(argv))
    return _kept(run / "base_model", before, ok and "base model folder" in message, message)


def _link_to_base(run: Path) -> Path:
    (run.parent / "link").symlink_to(run / "base_model")
    return run.parent / "link"


case("owned", "merge-into-base --out the base folder")(lambda tmp: _merge_into(tmp, lambda run: run / "base_model"))
case("owned", "merge-into-base --out a symlink to the base folder")(lambda tmp: _merge_into(tmp, _link_to_base))
case("owned", "merge-into-base --out the run folder holding the base")(lambda tmp: _merge_into(tmp, lambda run: run))
case("owned", "merge-into-base --out base_model/../base_model")(
    lambda tmp: _merge_into(tmp, lambda run: run / "base_model" / ".." / "base_model"))


# --- symlinks ---------------------------------------------------------------------------------------


def _through(tmp: Path, make_link) -> tuple[bool, str]:
    """Save, bump the weights, save again through a link made by ``make_link(tmp) -> (link, target)``."""
    m = model()
    link, target = make_link(tmp)
    m.save_pretrained(link)
    with __import__("torch").no_grad():
        for layer in m.molora_layers().values():
            layer.lora_B.add_(1.0)
    m.save_pretrained(link)
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), target)
    name = next(iter(m.molora_layers()))
    fresh = bool((loaded.molora_layers()[name].lora_B == m.molora_layers()[name].lora_B).all())
    ok = fresh and Path(link).is_symlink() or (fresh and link.parent.is_symlink())
    return ok, "saved into the link's target; the link is kept" if ok else "the link was replaced or the target is stale"


def _dir_link(tmp: Path):
    (tmp / "target").mkdir()
    (tmp / "link").symlink_to(tmp / "target")
    return tmp / "link", tmp / "target"


def _dangling(tmp: Path):
    (tmp / "link").symlink_to(tmp / "not-yet")
    return tmp / "link", tmp / "not-yet"


def _chain(tmp: Path):
    (tmp / "target").mkdir()
    (tmp / "l1").symlink_to(tmp / "target")
    (tmp / "l2").symlink_to(tmp / "l1")
    return tmp / "l2", tmp / "target"


def _parent_link(tmp: Path):
    (tmp / "real").mkdir()
    (tmp / "parent").symlink_to(tmp / "real")
    return tmp / "parent" / "a", tmp / "real" / "a"


case("owned", "save through a symlinked folder")(lambda tmp: _through(tmp, _dir_link))
case("owned", "save through a dangling symlink")(lambda tmp: _through(tmp, _dangling))
case("owned", "save through a chain of two symlinks")(lambda tmp: _through(tmp, _chain))
case("owned", "save under a symlinked parent folder")(lambda tmp: _through(tmp, _parent_link))


@case("owned", "export through a symlinked folder")
def _export_link(tmp: Path) -> tuple[bool, str]:
    (tmp / "target").mkdir()
    (tmp / "link").symlink_to(tmp / "target")
    model().export_merged_adapter(tmp / "link", task="all")
    model().export_merged_adapter(tmp / "link", task="all")
    ok = (tmp / "link").is_symlink() and (tmp / "target" / "task_0" / "adapter_config.json").is_file()
    return ok, "written into the target; the link is kept" if ok else "the link was replaced"


@case("owned", "a user's symlink inside the adapter folder")
def _inner_link(tmp: Path) -> tuple[bool, str]:
    (tmp / "notes.md").write_text("outside")
    model().save_pretrained(tmp / "a")
    (tmp / "a" / "notes.md").symlink_to(tmp / "notes.md")
    model().save_pretrained(tmp / "a")
    ok = (tmp / "a" / "notes.md").is_symlink() and (tmp / "notes.md").read_text() == "outside"
    return ok, "the link and its target are kept" if ok else "the link or its target was lost"


# --- modes ------------------------------------------------------------------------------------------


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def _resave_keeps_modes(tmp: Path, folder_mode: int, file_mode: int) -> tuple[bool, str]:
    """Save an adapter, set the folder's and its files' modes, save again: are the modes kept?"""
    model().save_pretrained(tmp / "a")
    os.chmod(tmp / "a", folder_mode)
    for p in (tmp / "a").iterdir():
        os.chmod(p, file_mode)
    before = _modes(tmp / "a")
    model().save_pretrained(tmp / "a")
    after = _modes(tmp / "a")
    return after == before, f"modes kept: {sorted(set(oct(m) for m in after.values()))}" if after == before else f"CHANGED: {after}"


@case("owned", "re-save of a private adapter (0700 / 0600)")
def _private(tmp: Path) -> tuple[bool, str]:
    return _resave_keeps_modes(tmp, 0o700, 0o600)


@case("owned", "new files of an export into a private folder")
def _private_export(tmp: Path) -> tuple[bool, str]:
    model().export_merged_adapter(tmp / "e")
    os.chmod(tmp / "e", 0o700)
    model().export_merged_adapter(tmp / "e", task="all")
    wide = {k: oct(m) for k, m in _modes(tmp / "e").items() if k.startswith("task_") and m & 0o077}
    return not wide, "no access beyond the folder's" if not wide else f"WIDER THAN THE FOLDER: {wide}"


@case("owned", "a group-shared adapter (0750 / 0640) stays shared")
def _group(tmp: Path) -> tuple[bool, str]:
    return _resave_keeps_modes(tmp, 0o750, 0o640)


@case("owned", "a fresh save under umask 077")
def _umask(tmp: Path) -> tuple[bool, str]:
    old = os.umask(0o077)
    try:
        model().save_pretrained(tmp / "a")
    finally:
        os.umask(old)
    modes = set(_modes(tmp / "a").values())
    return modes <= {0o700, 0o600}, f"modes {sorted(oct(m) for m in modes)}"
