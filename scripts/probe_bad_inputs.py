"""Probe molora with bad inputs; print one row per case: did it fail clearly, or accept silently?

    python scripts/probe_bad_inputs.py            # API and CLI cases (about a minute on 2 cores)
    python scripts/probe_bad_inputs.py --api-only # skip the command-line cases

A case passes when it raises an error of an expected type whose message names the field or file
(API), or when the command exits 2 with a one-line message and no traceback (CLI). Everything is
built offline from tiny configs in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import random_batch, tiny_llama, train_steps  # noqa: E402

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _model(router="task", **kw) -> MoLoRAModel:
    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, router=router, num_tasks=2, **kw)
    model = get_molora_model(tiny_llama(), cfg)
    train_steps(model, random_batch(), task_ids=torch.tensor([0, 1]))
    return model


def _saved(tmp: Path, name: str) -> Path:
    _model().save_pretrained(tmp / name)
    return tmp / name


def _edit_json(path: Path, key: str, value) -> Path:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    return path.parent


def _set(cfg: MoLoRAConfig, name: str, value) -> None:
    setattr(cfg, name, value)


def api_cases(tmp: Path) -> list[tuple[str, Callable[[], object], str]]:
    """(case, call, a word the message must contain)."""
    ids = random_batch()["input_ids"]
    return [
        ("config use_rslora='false'", lambda: MoLoRAConfig(use_rslora="false"), "use_rslora"),
        ("config lora_alpha=inf", lambda: MoLoRAConfig(lora_alpha=float("inf")), "lora_alpha"),
        ("config target_modules='q_proj(('", lambda: MoLoRAConfig(target_modules="q_proj(("), "target_modules"),
        ("config task_names ['x','x']", lambda: MoLoRAConfig(router="task", num_tasks=2, task_names=["x", "x"]), "task_names"),
        ("config top_k=99 set after construction", lambda: _set(MoLoRAConfig(), "top_k", 99), "top_k"),
        ("config unknown key num_expert", lambda: MoLoRAConfig.from_dict({"num_expert": 4}), "num_expert"),
        ("build: target module typo 'qproj'", lambda: get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["qproj"])), "target_modules"),
        ("build: target 'mlp' is not linear", lambda: get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["mlp"])), "mlp"),
        ("forward task_ids [0.9, 1.7]", lambda: _model()(input_ids=ids, task_ids=[0.9, 1.7]), "task_ids"),
        ("forward task_ids bool tensor", lambda: _model()(input_ids=ids, task_ids=torch.tensor([True, False])), "task_ids"),
        ("forward task_ids [1] for batch 2", lambda: _model()(input_ids=ids, task_ids=[1]), "task_ids"),
        ("forward task_ids [0, 5] (2 tasks)", lambda: _model()(input_ids=ids, task_ids=[0, 5]), "task_ids"),
        ("forward task_ids unknown name", lambda: _model()(input_ids=ids, task_ids=["a", "b"]), "task"),
        ("forward task router without task_ids", lambda: _model()(input_ids=ids), "task_ids"),
        ("load: empty folder", lambda: MoLoRAModel.from_pretrained(tiny_llama(), tmp), "molora_config.json"),
        ("load: corrupt JSON config", lambda: MoLoRAModel.from_pretrained(tiny_llama(), _corrupt_json(tmp)), "JSON"),
        ("load: truncated safetensors", lambda: MoLoRAModel.from_pretrained(tiny_llama(), _truncated(tmp)), "safetensors"),
        ("load: other base (hidden 64)", lambda: MoLoRAModel.from_pretrained(tiny_llama(hidden_size=64), _saved(tmp, "o")), "does not fit"),
        ("load: 'config': null", lambda: MoLoRAModel.from_pretrained(tiny_llama(), _edit_json(_saved(tmp, "n") / "molora_config.json", "config", None)), "config"),
        ("save onto an existing file", lambda: _model().save_pretrained(_a_file(tmp)), "not a folder"),
        ("export weights of shape (3,)", lambda: _model().export_merged_adapter(tmp / "e1", weights=torch.ones(3)), "weights"),
        ("export task=7 of 2", lambda: _model().export_merged_adapter(tmp / "e2", task=7), "task"),
        ("export svd rank=2,000,000", lambda: _model().export_merged_adapter(tmp / "e3", method="svd", rank=2_000_000), "rank"),
        ("export weights='measured' string", lambda: _model().export_merged_adapter(tmp / "e4", weights="measured"), "weights"),
        ("export task= on a top-k router", lambda: _model("topk", top_k=1).export_merged_adapter(tmp / "e5", task=0), "task"),
    ]


def _corrupt_json(tmp: Path) -> Path:
    path = _saved(tmp, "c")
    (path / "molora_config.json").write_text("{not json")
    return path


def _truncated(tmp: Path) -> Path:
    path = _saved(tmp, "t")
    weights = path / "molora_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


def _base(tmp: Path) -> str:
    tiny_llama().save_pretrained(tmp / "base")
    return str(tmp / "base")


def _a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file"


def cli_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    tiny = str(ROOT / "configs" / "tiny.yaml")
    bad_rows = tmp / "bad.jsonl"
    bad_rows.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    not_json = tmp / "gates.txt"
    not_json.write_text("not json")
    out = f"train.output_dir={tmp / 'run'}"
    return [
        ("train: target module typo", ["train", tiny, out, "molora.target_modules=[qproj]"]),
        ("train: malformed JSONL row", ["train", tiny, out, f"data.tasks.sort.train={bad_rows}"]),
        ("train: unknown override key", ["train", tiny, out, "train.learning_rat=1e-3"]),
        ("train: missing config file", ["train", str(tmp / "none.yaml")]),
        ("export: missing run folder", ["export", str(tmp / "no-run"), "--out", str(tmp / "x")]),
        ("export: --weights not JSON", ["export", str(_saved(tmp, "cli")), "--base", _base(tmp), "--out", str(tmp / "y"),
                                        "--weights", str(not_json)]),
    ]


def run_api(tmp: Path) -> list[tuple[str, bool, str]]:
    rows = []
    for name, call, word in api_cases(tmp):
        try:
            call()
        except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RuntimeError) as err:
            message = " ".join(line.strip(" -") for line in str(err).strip().splitlines()) or type(err).__name__
            rows.append((name, word.lower() in str(err).lower(), f"{type(err).__name__}: {message}"))
        except Exception as err:  # noqa: BLE001 - an unexpected error type is a finding
            rows.append((name, False, f"unexpected {type(err).__name__}: {err}"))
        else:
            rows.append((name, False, "accepted silently"))
    return rows


def run_cli(tmp: Path) -> list[tuple[str, bool, str]]:
    rows = []
    for name, argv in cli_cases(tmp):
        proc = subprocess.run([sys.executable, "-m", "molora.cli", *argv], capture_output=True, text=True, cwd=ROOT)
        text = (proc.stderr or proc.stdout).strip()
        clear = proc.returncode == 2 and "Traceback" not in proc.stderr and bool(text)
        last = text.splitlines()[-1] if text else "(nothing printed)"
        rows.append((name, clear, f"exit {proc.returncode}: {last}"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_api(Path(tmp))
        if not args.api_only:
            rows += run_cli(Path(tmp))
    print("| # | bad input | clear error | what the user sees |\n|---|---|---|---|")
    for i, (name, ok, message) in enumerate(rows, 1):
        print(f"| {i} | {name} | {'yes' if ok else '**NO**'} | {message[:150].replace('|', '/')} |")
    bad = sum(not ok for _, ok, _ in rows)
    print(f"\n{len(rows) - bad} of {len(rows)} bad inputs get a clear error")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
