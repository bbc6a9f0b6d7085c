"""Probe cases: a writer killed (SIGKILL) at a random moment of a save, an export or a checkpoint,
with the one-call swap and with the two-rename fallback. After the kill a reader must see the
old version or the new one, never a mix, recover what the kill left, and the next save must
work and leave nothing behind."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from probes import ROOT, case
from probes.fsutil import _hidden, _state, tiny_llama

from molora import MoLoRAModel

_rng = random.Random(17)  # random kill moments, the same on every run of the probe

_WRITER = r"""
import itertools, sys
from pathlib import Path
sys.path[:0] = [sys.argv[4], sys.argv[5]]
import torch
import molora.atomic as atomic
from probes.common import model

kind, target, fallback = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
if fallback:
    atomic._exchange = lambda a, b: False  # the two-rename swap of kernels without renameat2
a, b = model(), model()
with torch.no_grad():
    for layer in b.molora_layers().values():
        layer.lora_B.add_(1.0)

def save(m, path):
    if kind == "adapter":
        m.save_pretrained(path)
    elif kind == "export":
        m.export_merged_adapter(path, task="all")
    else:  # a checkpoint: adapter, optimizer state and trainer state in one folder
        with atomic.atomic_directory(path, expect=["adapter/molora_config.json", "trainer_state.json"]) as tmp:
            m.save_pretrained(tmp / "adapter")
            torch.save({"step": 2}, tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text('{"step": 2}')

save(a, target.parent / "ref_a")
save(b, target.parent / "ref_b")
save(a, target)
print("ready", flush=True)
for m in itertools.cycle([b, a]):
    save(m, target)
"""


def _read(kind: str, target: Path) -> None:
    """What a user's next read runs (each runs the recovery)."""
    if kind == "adapter":
        MoLoRAModel.from_pretrained(tiny_llama(), target)
    elif kind == "export":
        from molora.atomic import recover_directory

        recover_directory(target)  # what the next export of this folder runs first
    else:
        from molora.apps.commands.export import find_adapter_dir

        find_adapter_dir(target.parent.parent)  # molora export RUN: recovers every checkpoint


def _kill_case(kind: str, fallback: bool, delay: float) -> None:
    swap = "two-rename fallback" if fallback else "renameat2 swap"

    @case("kills", f"SIGKILL {delay:.2f}s into repeated {kind} saves ({swap})")
    def _run(tmp: Path) -> tuple[bool, str]:
        target = tmp / "run" / "checkpoints" / "step_0000002" if kind == "checkpoint" else tmp / "out"
        target.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-c", _WRITER, kind, str(target), str(int(fallback)), str(ROOT / "scripts"),
                str(ROOT / "tests")]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            return False, f"writer failed to start: {proc.stderr.read()[-200:]}"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        refs = _state(target.parent / "ref_a"), _state(target.parent / "ref_b")
        _read(kind, target)
        now = _state(target) if target.is_dir() else None
        if now not in refs:
            return False, f"DATA LOST: after the kill {target.name} is neither the old nor the new version"
        which = "old" if now == refs[0] else "new"
        _resave(kind, target)
        left = _hidden(target.parent)
        if left:
            return False, f"leftovers after the next save: {left}"
        return True, f"a reader sees the {which} version; the next save works and leaves nothing hidden"


def _resave(kind: str, target: Path) -> None:
    from probes.common import model

    from molora.atomic import atomic_directory

    m = model()
    if kind == "adapter":
        m.save_pretrained(target)
    elif kind == "export":
        m.export_merged_adapter(target, task="all")
    else:
        with atomic_directory(target) as tmp:
            m.save_pretrained(tmp / "adapter")
            (tmp / "trainer_state.json").write_text('{"step": 2}')


for _kind in ("adapter", "export", "checkpoint"):
    for _fallback in (False, True):
        for _ in range(2):
            _kill_case(_kind, _fallback, _rng.uniform(0.0, 1.5))
