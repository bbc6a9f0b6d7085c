"""examples/quickstart.py runs, and reloads its adapter onto the same base weights."""

from __future__ import annotations

import runpy

from conftest import REPO_ROOT


def test_quickstart_reloads_onto_the_same_base(capsys):
    example = runpy.run_path(str(REPO_ROOT / "examples" / "quickstart.py"), run_name="quickstart")
    diff = example["main"](steps=4)
    assert diff == 0.0
    out = capsys.readouterr().out
    assert "max |logit difference| to the trained one 0.00e+00" in out and "task 1 continues" in out
