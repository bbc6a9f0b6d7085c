"""Probe cases for ``scripts/probe_bad_inputs.py``, one module per area.

Each module in :data:`MODULES` registers its cases into :data:`CASES` when imported. A case is a
name, an area and a function ``run(tmp) -> (ok, what_the_user_sees)`` that gets its own empty
temporary folder. Three helpers build the usual kinds:

    from probes import case, api_error, cli_error

    api_error("config top_k=0", lambda tmp: MoLoRAConfig(top_k=0), "top_k", area="api")
    cli_error("export: missing run", lambda tmp: ["export", str(tmp / "none")], area="cli")

    @case("files", "save while another process writes")
    def _concurrent(tmp: Path) -> tuple[bool, str]:
        ...
        return ok, "what the user sees"

``api_error`` passes when the call raises an expected error type whose message contains the word;
``cli_error`` passes when the command exits 2 with a message and no traceback. A case that
raises an unexpected exception is reported as a failure with its type, never crashes the probe.
To add an area, write ``probes/<area>.py`` and add its name to :data:`MODULES`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers (tiny_models, tampering) serve the probes too
MODULES = ("api", "cli", "kills", "concurrent", "disk", "owned", "training")  # in the order probe_bad_inputs.py runs them
EXPECTED = (ValueError, TypeError, OSError, RuntimeError)  # OSError: missing, busy, read-only, full disk


@dataclass(frozen=True)
class Case:
    """One probe: ``run(tmp)`` returns (ok, one line of what the user sees)."""

    area: str
    name: str
    run: Callable[[Path], tuple[bool, str]]


CASES: list[Case] = []


def case(area: str, name: str) -> Callable[[Callable[[Path], tuple[bool, str]]], Callable]:
    """Decorator: register ``fn(tmp) -> (ok, message)`` as a probe case."""

    def register(fn: Callable[[Path], tuple[bool, str]]) -> Callable:
        CASES.append(Case(area, name, fn))
        return fn

    return register


def one_line(err: BaseException) -> str:
    """The error as the user sees it, on one line."""
    text = " ".join(line.strip(" -") for line in str(err).strip().splitlines())
    return f"{type(err).__name__}: {text or '(no message)'}"


def expect_error(call: Callable[[], object], word: str) -> tuple[bool, str]:
    """Run ``call``: ok when it raises an expected error type whose message contains ``word``."""
    try:
        call()
    except EXPECTED as err:
        return word.lower() in str(err).lower(), one_line(err)
    except Exception as err:  # noqa: BLE001 - an unexpected error type is a finding
        return False, f"unexpected {one_line(err)}"
    return False, "accepted silently"


def api_error(name: str, call: Callable[[Path], object], word: str, *, area: str = "api") -> None:
    """Register a case that passes when ``call(tmp)`` raises clearly, naming ``word``."""
    CASES.append(Case(area, name, lambda tmp: expect_error(lambda: call(tmp), word)))


def run_cli(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m molora.cli *argv`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "molora.cli", *argv], capture_output=True, text=True, cwd=ROOT, **kwargs)


def clear_exit(proc: subprocess.CompletedProcess, code: int = 2) -> tuple[bool, str]:
    """ok when the command exited ``code`` with a message and no traceback."""
    text = (proc.stderr or proc.stdout).strip()
    last = text.splitlines()[-1] if text else "(nothing printed)"
    ok = proc.returncode == code and "Traceback" not in proc.stderr and bool(text)
    return ok, f"exit {proc.returncode}: {last}"


def cli_error(name: str, argv: Callable[[Path], list[str]], *, area: str = "cli") -> None:
    """Register a case that passes when the command ``argv(tmp)`` exits 2 with a one-line message."""
    CASES.append(Case(area, name, lambda tmp: clear_exit(run_cli(argv(tmp)))))
