"""The recipe study's first task set: the demo's three real-text tasks on all-MiniLM-L6-v2.

The demo's own data, models and training loop (:mod:`molora.apps.demo`), with one change: a
seeded eval split of ``eval_per_task`` rows is held out of each task's training rows (the study
chooses on it); the demo's test split is only reported.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

__all__ = ["DemoSuite"]


class DemoSuite:
    """Trains one demo MoLoRA model per case and measures eval and test accuracy.

    Args:
        steps: optimizer steps per model (the demo's default is 150).
        eval_per_task: training rows held out per task as the eval split.
        quick: the demo's quick settings (tiny data, seconds per case).
    """

    name = "demo"
    metric = "accuracy"

    def __init__(self, *, steps: int, eval_per_task: int = 96, quick: bool = False):
        from molora.apps.demo.config import resolve_config
        from molora.apps.demo.run import _load_minilm
        from molora.training.data import MultitaskCollator

        self.cfg = resolve_config(None, quick=quick, steps=steps)
        self.steps = self.cfg.steps
        self.eval_per_task = min(eval_per_task, 16) if quick else eval_per_task
        self.tokenizer, self.base = _load_minilm()
        self.collator = MultitaskCollator.from_tokenizer(self.tokenizer)
        self._data: dict[int, tuple[list, list, list]] = {}

    def _seed_data(self, seed: int):
        """(tasks with the eval rows removed from train, eval rows per task, schedule) of a seed."""
        from molora.apps.demo.data import TaskData, load_data, make_schedule

        if seed not in self._data:
            cfg = replace(self.cfg, seed=seed)
            tasks, evals = [], []
            for task in load_data(cfg, self.tokenizer):
                order = list(range(len(task.train)))
                random.Random(seed).shuffle(order)
                held = set(order[: self.eval_per_task])
                evals.append([task.train[i] for i in sorted(held)])
                train = [row for i, row in enumerate(task.train) if i not in held]
                tasks.append(TaskData(task.name, task.labels, train, task.test))
            self._data[seed] = (tasks, evals, make_schedule(tasks, cfg))
        return self._data[seed]

    def run_case(self, router: str, ratio: float, aux: float, seed: int) -> tuple[dict[str, dict[str, float]], float]:
        """Train the demo model of router kind ``router`` at this router lr ratio and aux weight.

        Returns:
            ``({"eval": {task: accuracy}, "test": {task: accuracy}}, training seconds)``.
        """
        from molora.apps.demo.models import RECIPE_MODELS, build_model
        from molora.apps.demo.train import accuracy, predict, train

        tasks, evals, schedule = self._seed_data(seed)
        cfg = replace(self.cfg, seed=seed, router_lr_ratio=ratio, router_aux_loss_coef=aux)
        key = RECIPE_MODELS[router]
        model = build_model(key, self.base, tasks, cfg)
        t0 = time.perf_counter()
        train(model, key, tasks, schedule, self.collator, cfg, progress=False)
        train_s = time.perf_counter() - t0
        scores: dict[str, dict[str, float]] = {"eval": {}, "test": {}}
        for t, task in enumerate(tasks):
            for split, rows in (("eval", evals[t]), ("test", task.test)):
                logits = predict(model, t, rows, self.collator, cfg.eval_batch_size)  # (n, C)
                scores[split][task.name] = accuracy(logits, rows)
        return scores, train_s
