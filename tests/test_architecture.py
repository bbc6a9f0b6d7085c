"""The house rules of DESIGN §2, checked: one import direction, no cycles, small rooms, a small API."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import molora

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [REPO_ROOT / "molora", REPO_ROOT / "routers"]
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
PUBLIC_API = {
    "EXPERT_IMPLS",
    "MoLoRAConfig",
    "MoLoRALinear",
    "MoLoRAModel",
    "RoutingHealthCallback",
    "__version__",
    "create_molora_optimizer",
    "get_molora_model",
    "get_optimizer_param_groups",
    "load_balancing_loss",
    "measure_gates",
    "router_z_loss",
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py"))


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_linter_contracts_are_kept():
    result = subprocess.run(["lint-imports"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_no_module_below_the_facade_imports_the_package_root():
    """``from molora import X`` inside the library would import the facade (molora/__init__,
    which imports model, merge, ...) from below it: a cycle that import-linter's layers miss."""
    offenders = []
    for path in _modules():
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[:2] == ("molora", "apps") or rel == Path("molora/__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "molora" and node.level == 0:
                offenders.append(f"{rel}:{node.lineno} from molora import ...")
            if isinstance(node, ast.Import) and any(a.name == "molora" for a in node.names):
                offenders.append(f"{rel}:{node.lineno} import molora")
    assert not offenders, offenders


def test_routers_is_a_leaf():
    for path in (REPO_ROOT / "routers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[0] == "molora" for n in names), f"{path} imports molora"


def test_files_and_functions_stay_small():
    too_long = []
    for path in _modules():
        text = path.read_text()
        rel = path.relative_to(REPO_ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "split these by concept:\n" + "\n".join(too_long)


def test_package_root_exports_the_public_api_and_nothing_else():
    assert set(molora.__all__) == PUBLIC_API
    assert all(getattr(molora, name) is not None for name in PUBLIC_API)  # lazy names resolve (and get cached)
    public = {name for name in vars(molora) if not name.startswith("_")}
    # subpackages appear as attributes once imported; they are reached by their dotted names
    subpackages = {name for name in public if isinstance(getattr(molora, name), type(sys))}
    assert public - subpackages == PUBLIC_API - {"__version__"}


@pytest.mark.parametrize("module", ["molora.cli", "molora.apps.cli"])
def test_command_line_entry_points_import(module):
    assert callable(importlib.import_module(module).main)
