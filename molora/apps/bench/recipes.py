"""``molora bench recipes``: which router lr ratio and balancing-loss weight each router kind needs.

Sweeps router lr ratio (router lr / adapters' lr) x aux coefficient x router kind (soft, top-k,
top-p, task, HydraLoRA + task) on two task sets: the demo's three real-text tasks on
all-MiniLM-L6-v2 (:mod:`~molora.apps.bench.recipes_demo`) and four small causal-LM chat tasks on
a tiny Llama (:mod:`~molora.apps.bench.recipes_lm`). Every case is scored on an eval split and a
test split; the choice uses only eval, the table reports test. A screening pass runs the grid on
``--seeds``; the ``--finalists`` best settings of each router (by eval) then run on
``--final-seeds``, and only settings with every final seed can be chosen. Results accumulate in
the JSON (a case already there is not rerun), so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from molora.atomic import atomic_write_text

__all__ = ["ROUTERS", "add_arguments", "choose", "format_table", "run", "summarize"]

ROUTERS = ("soft", "topk", "topp", "task", "hydra+task")
SUITES = ("demo", "lm")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma list of {SUITES}")
    parser.add_argument("--routers", default=",".join(ROUTERS), help=f"comma list of {ROUTERS}")
    parser.add_argument("--ratios", type=_floats, default=[1.0, 5.0, 20.0, 50.0], help="router lr ratios")
    parser.add_argument("--aux", type=_floats, default=[0.0, 0.01], help="balancing-loss weights")
    parser.add_argument("--seeds", type=_ints, default=[0], help="screening seeds (the whole grid)")
    parser.add_argument("--final-seeds", type=_ints, default=[0, 1, 2], help="seeds of the finalists")
    parser.add_argument("--finalists", type=int, default=2, help="settings per router and suite that get the final seeds")
    parser.add_argument("--steps", type=int, default=None, help="steps per case (demo default 150, lm 200)")
    parser.add_argument("--lm-steps", type=int, default=None, help="steps per lm case (default --steps or 200)")
    parser.add_argument("--out", default="benchmarks/recipes.json")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the table here")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 1 router, 2 ratios, few steps")
    parser.add_argument("--inputs", default="", help="comma list of recipes JSONs to merge in first (parallel parts)")
    parser.add_argument("--no-run", action="store_true", help="only summarize what the JSONs hold")
    parser.add_argument("--threads", type=int, default=None)


def _case_record(scores: dict[str, dict[str, float]], train_s: float) -> dict[str, Any]:
    """A case's measurements from what a suite's ``run_case`` returns: the mean ``"eval"`` and
    ``"test"`` metric over the tasks, the per-task values (``scores``: split -> task -> metric)
    and the training seconds."""
    return {
        "eval": sum(scores["eval"].values()) / len(scores["eval"]),
        "test": sum(scores["test"].values()) / len(scores["test"]),
        "eval_tasks": scores["eval"],
        "test_tasks": scores["test"],
        "train_s": train_s,
    }


def _label(case: dict[str, Any]) -> str:
    """A case's task set and steps, as the table names them: ``demo@60``."""
    return f"{case['suite']}@{case['steps']}" if "steps" in case else case["suite"]


def _case_key(case: dict[str, Any]) -> str:
    return f"{_label(case)}|{case['router']}|{case['ratio']:g}|{case['aux']:g}|{case['seed']}"


def summarize(cases: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Group case results by suite and router into settings with mean +- std over seeds.

    Args:
        cases: ``{"suite", "steps", "router", "ratio", "aux", "seed", "eval", "test"}`` rows.

    Returns:
        ``{"suite@steps": {router: {"ratio|aux": {"ratio", "aux", "seeds", "eval", "eval_std",
        "test", "test_std"}}}}``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cases:
        groups.setdefault((_label(c), c["router"], c["ratio"], c["aux"]), []).append(c)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (suite, router, ratio, aux), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["seed"])
        entry: dict[str, Any] = {"ratio": ratio, "aux": aux, "seeds": [r["seed"] for r in rows]}
        for split in ("eval", "test"):
            values = [r[split] for r in rows]
            entry[split] = statistics.fmean(values)
            entry[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.setdefault(suite, {}).setdefault(router, {})[f"{ratio:g}|{aux:g}"] = entry
    return out


def choose(settings: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any] | None:
    """The setting with the best mean eval metric among those measured on every seed of ``seeds``
    (ties: the smaller ratio, then the smaller aux); None if no setting has them all."""
    full = [s for s in settings.values() if set(seeds) <= set(s["seeds"])]
    if not full:
        return None
    return max(full, key=lambda s: (s["eval"], -s["ratio"], -s["aux"]))


def _finalists(settings: dict[str, dict[str, Any]], seeds: list[int], k: int) -> list[dict[str, Any]]:
    """The ``k`` best settings by mean eval over the screening ``seeds``."""
    screened = [s for s in settings.values() if set(seeds) <= set(s["seeds"])]
    return sorted(screened, key=lambda s: (-s["eval"], s["ratio"], s["aux"]))[:k]


def format_table(summary: dict[str, dict[str, dict[str, Any]]], final_seeds: list[int], metric: dict[str, str]) -> str:
    """Markdown: per suite and router, every setting's eval and test mean +- std; the chosen
    setting (best eval over ``final_seeds``) in bold."""
    lines = []
    for suite, routers in summary.items():
        lines += [
            f"**{suite}** ({metric.get(suite, 'metric')}; chosen on eval over seeds {final_seeds}, in bold)",
            "",
            "| router | lr ratio | aux | seeds | eval | test |",
            "|---|---|---|---|---|---|",
        ]
        for router, settings in routers.items():
            best = choose(settings, final_seeds)
            for s in sorted(settings.values(), key=lambda s: (s["ratio"], s["aux"])):
                mark = "**" if s is best else ""
                lines.append(
                    f"| {mark}{router}{mark} | {s['ratio']:g} | {s['aux']:g} | {len(s['seeds'])} | "
                    f"{_mean_std(s, 'eval')} | {mark}{_mean_std(s, 'test')}{mark} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip()


def _mean_std(setting: dict[str, Any], split: str) -> str:
    """``mean ± std`` over the seeds; the value alone for one seed."""
    if len(setting["seeds"]) == 1:
        return f"{setting[split]:.3f}"
    return f"{setting[split]:.3f} ± {setting[split + '_std']:.3f}"


def _suite(name: str, args: argparse.Namespace):
    if name == "demo":
        from molora.apps.bench.recipes_demo import DemoSuite

        return DemoSuite(steps=args.steps or (6 if args.quick else 150), quick=args.quick)
    from molora.apps.bench.recipes_lm import LMSuite

    return LMSuite(steps=args.lm_steps or args.steps or (4 if args.quick else 200), quick=args.quick)


def _run_cases(suite, plan: list[tuple[str, float, float, int]], results: dict[str, Any], out: Path) -> None:
    """Run every case of ``plan`` not yet in ``results["cases"]``, saving after each."""
    done = {_case_key(c) for c in results["cases"]}
    for router, ratio, aux, seed in plan:
        case = {"suite": suite.name, "steps": suite.steps, "router": router, "ratio": ratio, "aux": aux, "seed": seed}
        if _case_key(case) in done:
            continue
        t0 = time.perf_counter()
        row = _case_record(*suite.run_case(router, ratio, aux, seed))
        case.update(row)
        results["cases"].append(case)
        print(
            f"{suite.name} {router:10s} ratio {ratio:g} aux {aux:g} seed {seed}: eval {row['eval']:.3f} "
            f"test {row['test']:.3f} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        _save(results, out)


def _load(path: Path) -> dict[str, Any]:
    """A recipes JSON; cases written without their steps take the file's ``"steps"`` by suite."""
    results = json.loads(path.read_text())
    for case in results["cases"]:
        if "steps" not in case and case["suite"] in results.get("steps", {}):
            case["steps"] = results["steps"][case["suite"]]
    return results


def _save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.routers, args.ratios, args.aux, args.seeds, args.final_seeds, args.finalists = "task", [1.0, 20.0], [0.0], [0], [0], 1
    routers, suites = args.routers.split(","), args.suites.split(",")
    for name, values, allowed in (("--routers", routers, ROUTERS), ("--suites", suites, SUITES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {list(allowed)}")
    out = Path(args.out)
    results = _load(out) if out.exists() else {"cases": []}
    for path in [p for p in args.inputs.split(",") if p]:
        part = _load(Path(path))
        keys = {_case_key(c) for c in results["cases"]}
        results["cases"] += [c for c in part["cases"] if _case_key(c) not in keys]
        results.setdefault("metric", {}).update(part.get("metric", {}))
    for name in [] if args.no_run else suites:
        suite = _suite(name, args)
        results.setdefault("metric", {})[name] = suite.metric
        label = f"{name}@{suite.steps}"
        grid = [(r, ratio, aux, s) for s in args.seeds for r in routers for ratio in args.ratios for aux in args.aux]
        _run_cases(suite, grid, results, out)
        summary = summarize([c for c in results["cases"] if _label(c) == label])
        final = [
            (router, s["ratio"], s["aux"], seed)
            for router in routers
            for s in _finalists(summary.get(label, {}).get(router, {}), args.seeds, args.finalists)
            for seed in args.final_seeds
        ]
        _run_cases(suite, final, results, out)
    results["final_seeds"] = args.final_seeds
    summary = summarize(results["cases"])
    results["chosen"] = {
        suite: {router: choose(settings, args.final_seeds) for router, settings in routers_.items()}
        for suite, routers_ in summary.items()
    }
    _save(results, out)
    table = format_table(summary, args.final_seeds, {f"{_label(c)}": results["metric"][c["suite"]] for c in results["cases"]})
    print(table)
    if args.markdown:
        atomic_write_text(Path(args.markdown), table + "\n")
    return 0
