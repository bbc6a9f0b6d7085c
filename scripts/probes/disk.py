"""Probe cases: a full disk (a small tmpfs, root only; skipped otherwise), read-only folders
(a read-only bind mount as root, chmod otherwise) and kills between the fallback swap's two
renames (``molora inspect`` and ``molora export RUN`` recover as the loaders do)."""

from __future__ import annotations

import json
from pathlib import Path

from probes import case, clear_exit, expect_error, run_cli
from probes.common import TINY, base, model
from probes.fsutil import _disk_full_error, _full_disk_case, _hidden, _read_only, _state, tiny_llama

import molora.atomic as atomic
from molora import MoLoRAModel
from molora.merge.export import save_gates


def _cli_full(argv: list[str], folder: Path | None) -> tuple[bool, str]:
    before = _state(folder) if folder is not None and folder.is_dir() else None
    ok, message = clear_exit(run_cli(argv))
    kept = (_state(folder) if before is not None else None) == before
    return ok and "is full" in message and kept, message + ("" if kept else " / FOLDER CHANGED")


def _save_full(disk: Path, fill) -> tuple[bool, str]:
    m = model()
    m.save_pretrained(disk / "a")
    fill()
    return _disk_full_error(lambda: m.save_pretrained(disk / "a"), disk / "a")


_full_disk_case("save_pretrained", _save_full)


def _export_full(disk: Path, fill) -> tuple[bool, str]:
    m = model()
    m.export_merged_adapter(disk / "e", task="all")
    fill()
    return _disk_full_error(lambda: m.export_merged_adapter(disk / "e", task="all"), disk / "e")


_full_disk_case("export_merged_adapter(task='all')", _export_full)


def _export_cli_full(disk: Path, fill) -> tuple[bool, str]:
    src = disk.parent / "src"
    model().save_pretrained(src)
    fill()
    return _cli_full(["export", str(src), "--base", base(disk.parent), "--out", str(disk / "e"), "--no-progress"], None)


_full_disk_case("molora export --out", _export_cli_full)


def _merge_cli_full(disk: Path, fill) -> tuple[bool, str]:
    src = disk.parent / "src"
    model().save_pretrained(src)
    fill()
    argv = ["export", str(src), "--base", base(disk.parent), "--task", "0", "--merge-into-base", "--out",
            str(disk / "m"), "--no-progress"]
    return _cli_full(argv, None)


_full_disk_case("molora export --merge-into-base (HF save_pretrained)", _merge_cli_full)


def _train_full(disk: Path, fill) -> tuple[bool, str]:
    fill()
    return _cli_full(["train", TINY, f"train.output_dir={disk / 'run'}", f"data.cache_dir={disk.parent / 'c'}"], None)


_full_disk_case("molora train into a full disk", _train_full)


def _text_full(disk: Path, fill) -> tuple[bool, str]:
    (disk / "x.json").write_text('{"old": true}')
    fill()
    return _disk_full_error(lambda: atomic.atomic_write_text(disk / "x.json", json.dumps({"new": "x" * 100000})), disk)


_full_disk_case("atomic_write_text of a JSON file", _text_full)


def _gates_full(disk: Path, fill) -> tuple[bool, str]:
    import torch

    fill()
    return _disk_full_error(lambda: save_gates({"l": torch.ones(4096)}, disk / "gates.safetensors"), disk)


_full_disk_case("save_gates (safetensors)", _gates_full)


def _torch_save_full(disk: Path, fill) -> tuple[bool, str]:
    import torch

    def write():
        with atomic.atomic_directory(disk / "ckpt") as tmp:
            torch.save({"x": torch.zeros(1 << 18)}, tmp / "optimizer.pt")  # torch's own error type

    (disk / "ckpt").mkdir()
    fill()
    return _disk_full_error(write, disk)


_full_disk_case("a checkpoint's torch.save", _torch_save_full)


# --- read-only folders ------------------------------------------------------------------------------


def _ro(tmp: Path, setup, act) -> tuple[bool, str]:
    folder = setup(tmp)
    before = _state(folder)
    with _read_only(folder):
        ok, message = act(folder)
    kept = _state(folder) == before
    return ok and kept, message + ("" if kept else " / FOLDER CHANGED")


def _adapter(tmp: Path) -> Path:
    model().save_pretrained(tmp / "ro" / "a")
    (tmp / "ro" / ".a.molora-tmp-leftover").mkdir()
    return tmp / "ro"


def _run(tmp: Path) -> Path:
    run = tmp / "run"
    model().save_pretrained(run / "final")
    records = [{"type": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _loads(path: Path) -> tuple[bool, str]:
    MoLoRAModel.from_pretrained(tiny_llama(), path)
    return True, "loads; the leftover it cannot clean is left alone"


case("disk", "read-only: load an adapter (with a leftover temp folder)")(lambda tmp: _ro(tmp, _adapter, lambda f: _loads(f / "a")))
case("disk", "read-only: save_pretrained into it")(
    lambda tmp: _ro(tmp, _adapter, lambda f: expect_error(lambda: model().save_pretrained(f / "a"), "cannot write")))
case("disk", "read-only: molora inspect ADAPTER")(
    lambda tmp: _ro(tmp, _adapter, lambda f: clear_exit(run_cli(["inspect", str(f / "a")]), code=0)))
case("disk", "read-only: molora inspect RUN (plots go elsewhere)")(
    lambda tmp: _ro(tmp, _run, lambda f: _note(run_cli(["inspect", str(f)]))))
case("disk", "read-only: molora export RUN --out elsewhere")(lambda tmp: _ro(tmp, _run, lambda f: clear_exit(
    run_cli(["export", str(f), "--base", base(tmp), "--out", str(tmp / "x"), "--no-progress"]), code=0)))
case("disk", "read-only: molora export --out a read-only folder")(lambda tmp: _ro(tmp, _adapter, lambda f: clear_exit(
    run_cli(["export", str(f / "a"), "--base", base(tmp), "--out", str(f / "x"), "--no-progress"]))))
case("disk", "read-only: molora train into a read-only output_dir")(lambda tmp: _ro(tmp, _run, lambda f: clear_exit(
    run_cli(["train", TINY, f"train.output_dir={f}", "--resume", f"data.cache_dir={tmp / 'c'}"]))))


def _note(proc) -> tuple[bool, str]:
    ok = proc.returncode == 0 and "Traceback" not in proc.stderr and "cannot write plots" in proc.stderr
    return ok, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"


def _ro_killed(tmp: Path) -> Path:
    """A read-only folder whose adapter was moved aside by a save killed between its renames."""
    model().save_pretrained(tmp / "ro" / "a")
    (tmp / "ro" / ".a.molora-old-x").mkdir()
    (tmp / "ro" / "a").rename(tmp / "ro" / ".a.molora-old-x" / "previous")
    return tmp / "ro"


case("disk", "read-only: load an adapter a kill left moved aside")(lambda tmp: _ro(tmp, _ro_killed, lambda f: expect_error(
    lambda: MoLoRAModel.from_pretrained(tiny_llama(), f / "a"), "molora_config.json")))


# --- a kill between the fallback swap's two renames ----------------------------------------------------


def _killed_between_renames(folder: Path) -> None:
    """What the fallback swap leaves when killed after moving ``folder`` aside."""
    aside = folder.parent / f".{folder.name}.molora-old-killed"
    aside.mkdir()
    folder.rename(aside / "previous")


def _killed_run(tmp: Path) -> Path:
    run = _run(tmp)
    model().save_pretrained(run / "checkpoints" / "step_0000002" / "adapter")
    (run / "checkpoints" / "step_0000002" / "trainer_state.json").write_text('{"step": 2}')
    _killed_between_renames(run / "final")
    _killed_between_renames(run / "checkpoints" / "step_0000002")
    return run


def _inspect_run(tmp: Path) -> tuple[bool, str]:
    run = _killed_run(tmp)
    proc = run_cli(["inspect", str(run), "--no-plots"])
    ok = proc.returncode == 0 and "checkpoints: step_0000002" in proc.stdout
    return ok, "lists the recovered checkpoint" if ok else f"exit {proc.returncode}: {proc.stdout[-150:]}"


def _export_run(tmp: Path) -> tuple[bool, str]:
    run = _killed_run(tmp)
    proc = run_cli(["export", str(run), "--base", base(tmp), "--out", str(tmp / "x"), "--no-progress"])
    ok = proc.returncode == 0 and f"adapter: {run / 'final'}" in proc.stderr and not _hidden(run)
    return ok, f"exit {proc.returncode}: exports the recovered final/" if ok else proc.stderr[-150:]


case("disk", "kill between renames: molora inspect RUN")(_inspect_run)
case("disk", "kill between renames: molora export RUN")(_export_run)
case("disk", "kill between renames: molora inspect RUN/final")(
    lambda tmp: clear_exit(run_cli(["inspect", str(_killed_run(tmp) / "final")]), code=0))


@case("disk", "molora export RUN holding only a hidden temp folder")
def _only_hidden(tmp: Path) -> tuple[bool, str]:
    model().save_pretrained(tmp / "run" / ".final.molora-tmp-killed")
    ok, message = clear_exit(run_cli(["export", str(tmp / "run"), "--out", str(tmp / "x")]))
    return ok and "no MoLoRA adapter" in message, message
