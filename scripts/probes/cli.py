"""Probe cases for the command line: each must exit 2 with one line and no traceback."""

from __future__ import annotations

from pathlib import Path

from probes import cli_error
from probes.common import TINY, base, saved


def _bad_rows(tmp: Path) -> str:
    (tmp / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    return str(tmp / "bad.jsonl")


def _not_json(tmp: Path) -> str:
    (tmp / "gates.txt").write_text("not json")
    return str(tmp / "gates.txt")


def _out(tmp: Path) -> str:
    return f"train.output_dir={tmp / 'run'}"


cli_error("train: target module typo", lambda tmp: ["train", TINY, _out(tmp), "molora.target_modules=[qproj]"])
cli_error("train: malformed JSONL row", lambda tmp: ["train", TINY, _out(tmp), f"data.tasks.sort.train={_bad_rows(tmp)}"])
cli_error("train: unknown override key", lambda tmp: ["train", TINY, _out(tmp), "train.learning_rat=1e-3"])
cli_error("train: missing config file", lambda tmp: ["train", str(tmp / "none.yaml")])
cli_error("export: missing run folder", lambda tmp: ["export", str(tmp / "no-run"), "--out", str(tmp / "x")])
cli_error("export: --weights not JSON",
          lambda tmp: ["export", str(saved(tmp, "cli")), "--base", base(tmp), "--out", str(tmp / "y"), "--weights", _not_json(tmp)])
