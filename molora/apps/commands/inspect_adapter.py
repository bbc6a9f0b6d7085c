"""``molora inspect ADAPTER_DIR``: what a saved adapter folder holds.

- a MoLoRA adapter (``molora_config.json``, written by ``save_pretrained``): its config, the
  shape of every layer's experts, the parameter count, and for the task router the per-task
  gate table (the (N,) gates each task gives each layer's experts, what a per-task export uses);
- a PEFT LoRA adapter (``adapter_config.json``, e.g. a molora export): its config, per-module
  shapes, the parameter count, the export report (method, errors, fidelity) when there is one,
  and whether vLLM serves it as it is (:func:`molora.merge.vllm.check_vllm_adapter`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["describe_adapter", "is_adapter_dir"]


def is_adapter_dir(path: Path) -> bool:
    """A saved MoLoRA or PEFT adapter folder (and not a training run folder)."""
    return (path / "molora_config.json").is_file() or (path / "adapter_config.json").is_file()


def _shapes_by_module(tensors: dict[str, list[int]], strip: str = "") -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for key, shape in tensors.items():
        key = key.removeprefix(strip)
        for part in (".lora_A", ".lora_B", ".router."):
            if part in key:
                module, rest = key.split(part, 1)
                label = part.strip(".") + (rest if rest.startswith(".") or not rest else "." + rest)
                out.setdefault(module, {})[label.removesuffix(".weight")] = shape
                break
        else:
            out.setdefault(key.rsplit(".", 1)[0], {})[key.rsplit(".", 1)[-1]] = shape
    return out


def _table(shapes: dict[str, dict[str, list[int]]]) -> list[str]:
    width = max([6] + [len(m) for m in shapes])
    lines = [f"  {'module':<{width}}  tensors"]
    for module, parts in shapes.items():
        lines.append(f"  {module:<{width}}  " + ", ".join(f"{k} {tuple(v)}" for k, v in parts.items()))
    return lines


def _task_gates(path: Path, config: dict[str, Any], layers: list[str]) -> list[str]:
    """Per-layer, per-task gates of a task router, from the saved tables."""
    from safetensors.torch import load_file

    from routers.task import TaskRouter

    weights = load_file(str(path / "molora_model.safetensors"))
    names = config.get("task_names") or [str(t) for t in range(config["num_tasks"])]
    lines = ["  per-task gates (N experts per layer; what a per-task export uses):"]
    width = max(len(n) for n in layers)
    lines.append(f"  {'layer':<{width}}  " + "  ".join(f"{n:<{6 * config['num_experts']}}" for n in names))
    for layer in layers:
        if f"{layer}.router.table" not in weights:  # router_sharing="block": the block's first layer routes
            continue
        router = TaskRouter(
            num_experts=config["num_experts"],
            num_tasks=config["num_tasks"],
            top_k=config.get("top_k"),
            normalize_top_k=config.get("normalize_top_k"),
        )
        router.table.data.copy_(weights[f"{layer}.router.table"])
        cells = [" ".join(f"{w:.2f}" for w in router.task_weights(t).tolist()) for t in range(config["num_tasks"])]
        lines.append(f"  {layer:<{width}}  " + "  ".join(f"{c:<{6 * config['num_experts']}}" for c in cells))
    return lines


def _describe_molora(path: Path) -> list[str]:
    from molora import MoLoRAConfig
    from molora.io import read_metadata

    meta = read_metadata(path)
    config, tensors = meta["config"], meta["tensors"]
    try:  # what loading it would check: an adapter with an invalid config is not shown as fine
        MoLoRAConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        problems = " ".join(line.strip() for line in str(e).splitlines())
        raise ValueError(f"{path / 'molora_config.json'}: its config is invalid: {problems}") from e
    shapes = _shapes_by_module(tensors)
    params = sum(math.prod(s) for s in tensors.values())
    keys = (
        "router",
        "num_experts",
        "r",
        "lora_alpha",
        "top_k",
        "num_tasks",
        "task_names",
        "use_rslora",
        "target_modules",
    )
    lines = [f"MoLoRA adapter: {path}", f"  base model: {meta.get('base_model_name_or_path')}"]
    lines.append("  config: " + ", ".join(f"{k}={config.get(k)!r}" for k in keys if config.get(k) is not None))
    lines.append(f"  {len(meta['modules'])} layers, {params:,d} parameters (experts, routers, modules_to_save)")
    if meta.get("modules_to_save"):
        lines.append(f"  modules_to_save: {meta['modules_to_save']}")
    lines += _table(shapes)
    if config.get("router") == "task":
        lines += _task_gates(path, config, list(meta["modules"]))
    return lines


def _describe_peft(path: Path) -> list[str]:
    from safetensors import safe_open

    from molora.merge.vllm import check_vllm_adapter

    config = json.loads((path / "adapter_config.json").read_text())
    lines = [f"PEFT LoRA adapter: {path}", f"  base model: {config.get('base_model_name_or_path')}"]
    keys = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "modules_to_save", "bias", "use_dora")
    lines.append("  config: " + ", ".join(f"{k}={config.get(k)!r}" for k in keys if config.get(k) not in (None, {})))
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        shapes = _shapes_by_module(tensors, strip="base_model.model.")
        lines.append(f"  {len(shapes)} modules, {sum(math.prod(s) for s in tensors.values()):,d} parameters")
        lines += _table(shapes)
    report_path = path / "merge_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        errors = [row["rel_error"] for row in report.get("layers", {}).values()]
        lines.append(
            f"  molora export: method {report.get('method')}, target {report.get('target', 'peft')}, "
            f"max rel. error {max(errors, default=0.0):.3e}, task {report.get('task')}"
        )
        if report.get("fidelity"):
            f = report["fidelity"]
            losses = (
                ""
                if f["loss_routed"] is None
                else f", loss routed {f['loss_routed']:.4f} exported {f['loss_exported']:.4f}"
            )
            lines.append(f"  fidelity: mean KL {f['mean_kl']:.3e}, max |dlogit| {f['max_abs_logit_diff']:.3e}{losses}")
    problems = check_vllm_adapter(path)
    lines.append("  vLLM: servable as it is" if not problems else "  vLLM: not servable as it is:")
    lines += [f"    - {p}" for p in problems]
    return lines


def describe_adapter(path: Path) -> str:
    """The text ``molora inspect ADAPTER_DIR`` prints."""
    if (path / "molora_config.json").is_file():
        return "\n".join(_describe_molora(path))
    return "\n".join(_describe_peft(path))
