"""``molora bench distill``: the routed top-k model against its SVD static merge and its distilled LoRA.

Two studies, both at one rank (default 16), per task:

- **tiny** (causal LM): ``molora train configs/tiny.yaml`` with its top-k router for
  ``--tiny-steps`` steps, then ``molora export RUN --task all --weights measured --target vllm``
  with ``--method svd`` and ``--method distill``; the table gives each export's mean KL against
  the routed model, max |Δlogit| and eval loss on the run's eval files (which distillation
  never trains on; it trains on the training files).
- **demo** (``--demo``; needs the ``demo`` extra): the demo's top-k model (MiniLM, three text
  classification tasks) trained as ``molora demo`` trains it; per task, the SVD merge of that
  task's measured gates and the distilled LoRA (trained on the task's training rows, matching
  the encoder's hidden states) are scored on the test split against the routed model's accuracy.

``--markdown FILE`` writes the tables as a section of FILE (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=16, help="export rank (default 16)")
    parser.add_argument("--tiny-steps", type=int, default=40, help="training steps of the tiny top-k run")
    parser.add_argument("--distill-steps", type=int, default=None, help="most distillation steps (default 300)")
    parser.add_argument("--demo", action="store_true", help="also the demo's top-k model (accuracy, ~5 min)")
    parser.add_argument("--demo-steps", type=int, default=None, help="training steps of the demo model")
    parser.add_argument("--demo-distill-steps", type=int, default=120, help="most distillation steps per demo task")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny causal-LM study")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--markdown", default=None, help="write the tables as a section of this file")


def run(args: argparse.Namespace) -> int:
    from molora.apps.bench.report import format_table, update_markdown

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        t0 = time.perf_counter()
        sections, md = [], []
        if not args.no_tiny:
            tiny_rows = _tiny(work / "tiny", args)
            head = ["task", "export", "mean KL", "max |dlogit|", "loss routed", "loss export", "gap"]
            sections += [f"tiny top-k run ({args.tiny_steps} steps), rank {args.rank}, target vllm", format_table(head, tiny_rows)]
            md += ["Causal LM (configs/tiny.yaml, top-2 of 4 experts, per-task measured gates, vLLM target):", "",
                   format_table(head, tiny_rows, markdown=True), ""]  # fmt: skip
        if args.demo:
            demo_rows = _demo(work / "demo", args)
            demo_head = ["task", "routed acc", "svd merge acc", "distilled acc", "svd MSE", "distilled MSE"]
            sections += [f"\ndemo top-k model, rank {args.rank} (test split)", format_table(demo_head, demo_rows)]
            md += ["Demo top-k model (MiniLM encoder, test accuracy; the student matches hidden states):", "",
                   format_table(demo_head, demo_rows, markdown=True)]  # fmt: skip
    print("\n".join(sections))
    print(f"({time.perf_counter() - t0:.0f}s)")
    if args.markdown:
        cmd = f"molora bench distill --rank {args.rank} --tiny-steps {args.tiny_steps}" + (" --demo" if args.demo else "")
        cmd += " --no-tiny" if args.no_tiny else ""
        update_markdown(args.markdown, "bench_distill", _markdown(md, cmd))
        print(f"wrote section bench_distill of {args.markdown}")
    return 0


def _markdown(lines: list[str], command: str) -> str:
    head = [
        "## Distilled export: routed top-k model vs SVD static merge vs distilled LoRA",
        "",
        f"`{command}` (CPU). Fidelity on eval data that distillation did not train on.",
        "",
    ]
    return "\n".join(head + lines)


def _tiny(work: Path, args: argparse.Namespace) -> list[list[str]]:
    """Train the tiny top-k run, export svd and distill, and return the per-task fidelity rows."""
    from molora.apps.cli import main

    config = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    run_dir = work / "run"
    overrides = [f"train.output_dir={run_dir}", f"train.max_steps={args.tiny_steps}", "train.export=false",
                 f"data.cache_dir={work / 'cache'}"]  # fmt: skip
    if main(["train", str(config), *overrides]) != 0:
        raise RuntimeError("the tiny training run failed")
    rows = []
    for method in ("svd", "distill"):
        out = work / method
        cmd = ["export", str(run_dir), "--out", str(out), "--task", "all", "--weights", "measured", "--method", method,
               "--rank", str(args.rank), "--target", "vllm", "--no-progress"]  # fmt: skip
        if method == "distill" and args.distill_steps:
            cmd += ["--distill-steps", str(args.distill_steps)]
        if main(cmd) != 0:
            raise RuntimeError(f"molora export --method {method} failed")
        report = json.loads((out / "merge_report.json").read_text())
        for task, rep in report.items():
            f = rep["fidelity"]
            gap = f["loss_exported"] - f["loss_routed"]
            rows.append([task, method, f"{f['mean_kl']:.4f}", f"{f['max_abs_logit_diff']:.2f}", f"{f['loss_routed']:.3f}",
                         f"{f['loss_exported']:.3f}", f"{gap:+.3f}"])  # fmt: skip
    return sorted(rows, key=lambda r: (r[0], r[1] != "svd"))


def _demo(work: Path, args: argparse.Namespace) -> list[list[str]]:
    """Train the demo's top-k model; per task, accuracy of the routed model, SVD merge and distilled LoRA."""
    import torch

    from molora.apps.demo.config import resolve_config
    from molora.apps.demo.data import make_schedule
    from molora.apps.demo.run import _load_minilm, _load_tasks
    from molora.apps.demo.train import accuracy, predict, train_and_evaluate
    from molora.merge.distill import DistillConfig, distilled_layer_factors
    from molora.merge.fidelity import static_adapter
    from molora.merge.gates import measure_gates
    from molora.training.data import MultitaskCollator

    cfg = resolve_config(None, steps=args.demo_steps)
    tokenizer, base = _load_minilm()
    tasks = _load_tasks(cfg, tokenizer)
    collator = MultitaskCollator.from_tokenizer(tokenizer)
    trained = train_and_evaluate("molora-topk", base, tasks, make_schedule(tasks, cfg), collator, cfg, True)
    model, encoder = trained.model, trained.model.encoder
    layers = encoder.molora_layers()
    rows = []
    for t, task in enumerate(tasks):
        train = [_with_task(b, t) for b in _batches(task.train[:1024], cfg.batch_size, collator)]
        gates = measure_gates(encoder, train)
        dcfg = DistillConfig(steps=args.demo_distill_steps)
        distilled, svd, rep = distilled_layer_factors(
            encoder, layers, gates, rank=args.rank, batches=train, task=None, config=dcfg, progress=True,
            desc=f"distill {task.name}",
        )  # fmt: skip
        accs = []
        for factors in (svd, distilled):
            pairs = {n: (f.lora_A, f.lora_B) for n, f in factors.items()}
            with static_adapter(encoder, pairs), torch.no_grad():
                accs.append(accuracy(predict(model, t, task.test, collator, cfg.eval_batch_size), task.test))
        rows.append([task.name, f"{trained.row['accuracy'][task.name]:.3f}", f"{accs[0]:.3f}", f"{accs[1]:.3f}",
                     f"{rep['holdout_start']:.2e}", f"{rep['holdout_best']:.2e}"])  # fmt: skip
    return rows


def _batches(rows: list[dict[str, Any]], size: int, collator):
    from molora.apps.demo.data import batches

    return list(batches(rows, size, collator))


def _with_task(batch: dict, task: int) -> dict:
    import torch

    out = {k: v for k, v in batch.items() if k != "labels"}
    out["task_ids"] = torch.full((batch["input_ids"].shape[0],), task, dtype=torch.long)
    return out
