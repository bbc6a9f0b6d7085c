"""Probe cases: concurrent readers and writers. Readers run while a save is in progress (in
another process, or at the worst moment in this one); a second writer of a folder or a run is
refused plainly while the first holds the writer lock; stale locks and leftovers of dead
writers do not block anyone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tampering import locked_by_another_process

import molora.atomic as atomic
from molora import MoLoRAModel
from probes import ROOT, case, clear_exit, expect_error, run_cli
from probes.common import TINY, base, model
from probes.fsutil import _api_busy, _bumped, _cli_busy, _hidden, _refused_while_locked, tiny_llama

_READER = r"""
import sys
sys.path[:0] = [sys.argv[3]]
from pathlib import Path
from tiny_models import tiny_llama
from molora import MoLoRAModel
path, n = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
for i in range(n):
    MoLoRAModel.from_pretrained(tiny_llama(), path)
print("ok", n, flush=True)
"""


def _reader_during_saves(tmp: Path, *, fallback: bool) -> tuple[bool, str]:
    """A process loading the adapter 15 times while this one saves it over and over."""
    m, path = model(), tmp / "a"
    m.save_pretrained(path)
    proc = subprocess.Popen([sys.executable, "-c", _READER, str(path), "15", str(ROOT / "tests")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    real, saves = atomic._exchange, 0
    if fallback:
        atomic._exchange = lambda a, b: False
    try:
        while proc.poll() is None:
            _bumped(m, 0.5).save_pretrained(path)
            saves += 1
    finally:
        atomic._exchange = real
    out, err = proc.communicate()
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), path)
    if proc.returncode != 0:
        return False, f"reader failed after {saves} saves: {err.strip().splitlines()[-1]}"
    return loaded is not None and not _hidden(tmp), f"{saves} saves, 15 loads in another process, all complete"


case("concurrent", "a process loads while another saves (renameat2 swap)")(lambda tmp: _reader_during_saves(tmp, fallback=False))
case("concurrent", "a process loads while another saves (two-rename fallback)")(lambda tmp: _reader_during_saves(tmp, fallback=True))


def _reader_in_mid_save(tmp: Path, read) -> tuple[bool, str]:
    """``read(path)`` runs inside a save, after the weights and before the config are written."""
    m, path = model(), tmp / "a"
    m.save_pretrained(path)
    import molora.io as mio

    real = mio.atomic_write_text

    def read_then_write(target, text):
        read(path)
        real(target, text)

    mio.atomic_write_text = read_then_write
    try:
        _bumped(m).save_pretrained(path)
    finally:
        mio.atomic_write_text = real
    names = sorted(p.name for p in path.iterdir())
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), path)
    layer = next(iter(m.molora_layers()))
    same = bool((loaded.molora_layers()[layer].lora_B == m.molora_layers()[layer].lora_B).all())
    ok = names == ["molora_config.json", "molora_model.safetensors"] and same
    return ok, "the save completed with the new weights" if ok else f"DATA LOST: the save published {names}"


case("concurrent", "from_pretrained in the middle of a save")(
    lambda tmp: _reader_in_mid_save(tmp, lambda p: MoLoRAModel.from_pretrained(tiny_llama(), p)))
case("concurrent", "molora export of the folder in the middle of a save")(
    lambda tmp: _reader_in_mid_save(tmp, lambda p: run_cli(["export", str(p), "--base", base(tmp), "--out",
                                                              str(tmp / "x"), "--no-progress"])))
case("concurrent", "molora inspect of the folder in the middle of a save")(
    lambda tmp: _reader_in_mid_save(tmp, lambda p: run_cli(["inspect", str(p)])))


@case("concurrent", "two processes save one folder at the same time")
def _two_writers(tmp: Path) -> tuple[bool, str]:
    code = (
        "import sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]\n"
        "from probes.common import model\nfrom molora.atomic import FolderBusyError\nm = model(); busy = 0\n"
        "print('ready', flush=True)\nfor _ in range(15):\n"
        "    try: m.save_pretrained(sys.argv[1])\n    except FolderBusyError: busy += 1\nprint(busy)\n"
    )
    m, path = model(), tmp / "a"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(ROOT / "scripts"), str(ROOT / "tests")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    mine = busy = 0
    while proc.poll() is None:
        try:
            m.save_pretrained(path)
            mine += 1
        except atomic.FolderBusyError:
            busy += 1
    out, err = proc.communicate()
    if proc.returncode:
        return False, f"the other writer crashed: {err.strip().splitlines()[-1]}"
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), path)
    ok = loaded is not None and not _hidden(tmp)
    return ok, f"{mine} saves here, {busy} + {out.strip()} refused as busy, the folder complete, nothing left behind"


@case("concurrent", "save_pretrained while another process holds the lock")
def _busy_save(tmp: Path) -> tuple[bool, str]:
    model().save_pretrained(tmp / "a")
    return _refused_while_locked(tmp / "a", lambda: _api_busy(lambda: model().save_pretrained(tmp / "a")))


@case("concurrent", "export_merged_adapter while another process holds the lock")
def _busy_export(tmp: Path) -> tuple[bool, str]:
    model().export_merged_adapter(tmp / "e", task="all")
    return _refused_while_locked(tmp / "e", lambda: _api_busy(lambda: model().export_merged_adapter(tmp / "e", task="all")))


@case("concurrent", "molora export --out a folder another process writes")
def _busy_export_cli(tmp: Path) -> tuple[bool, str]:
    model().save_pretrained(tmp / "a")
    argv = ["export", str(tmp / "a"), "--base", base(tmp), "--out", str(tmp / "e"), "--no-progress"]
    return _refused_while_locked(tmp / "e", lambda: _cli_busy(argv))


@case("concurrent", "molora export --merge-into-base --out a folder another process writes")
def _busy_merge_cli(tmp: Path) -> tuple[bool, str]:
    model().save_pretrained(tmp / "a")
    argv = ["export", str(tmp / "a"), "--base", base(tmp), "--task", "0", "--merge-into-base", "--out", str(tmp / "m"),
            "--no-progress"]
    return _refused_while_locked(tmp / "m", lambda: _cli_busy(argv))


@case("concurrent", "two molora train runs into one output_dir (overwrite_output_dir=true)")
def _busy_train(tmp: Path) -> tuple[bool, str]:
    run = tmp / "run"
    (run / "checkpoints" / "step_0000003").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n')
    argv = ["train", TINY, f"train.output_dir={run}", "train.overwrite_output_dir=true", f"data.cache_dir={tmp / 'c'}"]
    ok, message = _refused_while_locked(run, lambda: _cli_busy(argv))
    kept = (run / "checkpoints" / "step_0000003").is_dir() and (run / "metrics.jsonl").is_file()
    return ok and kept, message + ("" if kept else " / THE FIRST RUN'S FILES WERE DELETED")


@case("concurrent", "molora train --resume while another process writes the run")
def _busy_resume(tmp: Path) -> tuple[bool, str]:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    argv = ["train", TINY, f"train.output_dir={run}", "--resume", f"data.cache_dir={tmp / 'c'}"]
    return _refused_while_locked(run, lambda: _cli_busy(argv))


def _reads_while_locked(tmp: Path, read) -> tuple[bool, str]:
    model().save_pretrained(tmp / "a")
    (tmp / ".a.molora-tmp-inprogress").mkdir()  # the writer's folder in progress
    with locked_by_another_process(tmp / "a", holder="probe"):
        ok, message = read(tmp / "a")
    kept = (tmp / ".a.molora-tmp-inprogress").is_dir()
    return ok and kept, message + ("" if kept else " / THE WRITER'S FOLDER IN PROGRESS WAS DELETED")


def _load_ok(path: Path) -> tuple[bool, str]:
    MoLoRAModel.from_pretrained(tiny_llama(), path)
    return True, "loads the published version; the save in progress is left alone"


case("concurrent", "from_pretrained while a writer holds the lock")(lambda tmp: _reads_while_locked(tmp, _load_ok))
case("concurrent", "molora inspect ADAPTER while a writer holds the lock")(
    lambda tmp: _reads_while_locked(tmp, lambda p: clear_exit(run_cli(["inspect", str(p)]), code=0)))
case("concurrent", "molora export ADAPTER while a writer holds the lock")(
    lambda tmp: _reads_while_locked(tmp, lambda p: clear_exit(run_cli(
        ["export", str(p), "--base", base(tmp), "--out", str(tmp / "x"), "--no-progress"]), code=0)))


@case("concurrent", "stale lock file of a killed writer")
def _stale_lock(tmp: Path) -> tuple[bool, str]:
    (tmp / ".a.molora-lock").write_text("pid 999999 on a-dead-host")
    model().save_pretrained(tmp / "a")
    left = _hidden(tmp)
    return not left, "the save goes ahead (the kernel dropped the dead writer's flock)" if not left else f"left {left}"


@case("concurrent", "leftover temporary folder of a killed save, then a load")
def _leftover_folder(tmp: Path) -> tuple[bool, str]:
    model().save_pretrained(tmp / "a")
    (tmp / ".a.molora-tmp-killed").mkdir()
    (tmp / ".a.molora-tmp-killed" / "molora_model.safetensors").write_bytes(b"partial")
    MoLoRAModel.from_pretrained(tiny_llama(), tmp / "a")
    left = _hidden(tmp)
    return not left, "no writer at work: the load removed the leftover" if not left else f"left {left}"


@case("concurrent", "temporary files of a dead and of a live file writer")
def _temp_files(tmp: Path) -> tuple[bool, str]:
    dead, live = tmp / ".x.json.molora-tmp-999999-abc", tmp / f".x.json.molora-tmp-{os.getpid()}-def"
    dead.write_text("partial")
    live.write_text("being written")
    atomic.atomic_write_text(tmp / "x.json", "{}")
    ok = not dead.exists() and live.exists() and (tmp / "x.json").read_text() == "{}"
    return ok, "the dead writer's temp file is removed, the live one's kept" if ok else f"left {_hidden(tmp)}"


@case("concurrent", "a reader of a folder whose writer waits between its two renames")
def _reader_waits(tmp: Path) -> tuple[bool, str]:
    """The fallback swap moved the folder aside and is about to rename the new one in."""
    m = model()
    m.save_pretrained(tmp / "a")
    aside = tmp / ".a.molora-old-x"
    aside.mkdir()
    os.rename(tmp / "a", aside / "previous")
    with locked_by_another_process(tmp / "a", holder="probe"):
        ok, message = expect_error(lambda: MoLoRAModel.from_pretrained(tiny_llama(), tmp / "a"), "molora_config.json")
    return ok and aside.is_dir(), f"a clear error, the writer's work left alone: {message}"
