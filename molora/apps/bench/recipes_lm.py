"""The recipe study's second task set: four small causal-LM chat tasks on a tiny Llama.

A 2-layer Llama built from config (random weights, seeded once, the same base for every case,
``initializer_range`` 0.2 as ``configs/tiny.yaml`` so that adapters can steer its frozen head),
molora's byte ids (0 pad, 1 ``<s>``, 2 ``</s>``, 3 + byte), and four string tasks generated here
on random letter strings, a prompt and a response each, as ``configs/data``:
``reverse: dab =`` -> `` bad``, ``sort``, ``upper`` and ``shift`` (each letter + 1). The loss
and the metric are on the response tokens (and ``</s>``) only; the metric is the teacher-forced
token accuracy. Batches hold one task each, tasks in turn; the task router gets the task id.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LM_TASKS", "LMSuite"]

LETTERS = "abcdefgh"

LM_TASKS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "upper": lambda s: s.upper(),
    "shift": lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s),
}
"""Task name -> the response of a letter string."""


def _encode(prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: ``<s> prompt response </s>``, labels -100 on the prompt."""
    p = [1] + [3 + b for b in prompt.encode()]
    r = [3 + b for b in response.encode()] + [2]
    return p + r, [-100] * len(p) + r


def _examples(task: str, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    out = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
        out.append(_encode(f"{task}: {s} =", " " + LM_TASKS[task](s)))
    return out


def _collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, L)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class LMSuite:
    """Trains one MoLoRA tiny Llama per case and measures eval and test response-token accuracy.

    Args:
        steps: optimizer steps per case.
        quick: a tiny run (a few steps, small splits).
        num_experts, r: N experts of rank r on every linear layer (HydraLoRA: its budget rank).
    """

    name = "lm"
    metric = "token accuracy"

    def __init__(self, *, steps: int, quick: bool = False, num_experts: int = 4, r: int = 4):
        from transformers import LlamaConfig, LlamaForCausalLM

        self.steps, self.num_experts, self.r = steps, num_experts, r
        self.batch_size, self.lr = 16, 5e-3
        self.sizes = (32, 16, 16) if quick else (256, 64, 64)  # train, eval, test per task
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=260,
            max_position_embeddings=64,
            initializer_range=0.2,
        )
        torch.manual_seed(1234)
        self.base = LlamaForCausalLM(config).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def _molora(self, router: str, aux: float):
        import copy

        from molora import MoLoRAConfig, get_molora_model

        n, r = self.num_experts, self.r
        kwargs: dict[str, Any] = {"router": router}
        if router in ("task", "hydra+task"):
            kwargs = {"router": "task", "num_tasks": len(LM_TASKS), "task_names": list(LM_TASKS)}
        if router == "hydra+task":
            kwargs.update(share_lora_A=True)
            r = max(1, round(2 * n * r / (n + 1)))  # the N experts' budget on square layers
        if router == "topk":
            kwargs.update(top_k=2)
        if router == "topp":
            kwargs.update(top_p=0.5)
        config = MoLoRAConfig(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            num_experts=n,
            r=r,
            lora_alpha=2.0 * r,
            router_aux_loss_coef=aux,
            expert_impl="dense",
            **kwargs,
        )
        return get_molora_model(copy.deepcopy(self.base), config)

    def run_case(self, router: str, ratio: float, aux: float, seed: int) -> tuple[dict[str, dict[str, float]], float]:
        """Train router kind ``router`` at this router lr ratio and aux weight; test it.

        Returns:
            ``({"eval": {task: token accuracy}, "test": {task: token accuracy}}, training seconds)``.
        """
        rng = random.Random(seed)
        n_train, n_eval, n_test = self.sizes
        data = {t: [_examples(t, n, rng) for n in (n_train, n_eval, n_test)] for t in LM_TASKS}
        torch.manual_seed(seed)
        model = self._molora(router, aux)
        routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
        others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
        groups = [{"params": others}] + ([{"params": routers, "lr": self.lr * ratio}] if routers else [])
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.0)
        warmup = max(1, self.steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (self.steps - s) / max(1, self.steps - warmup)))
        )
        model.train()
        t0 = time.perf_counter()
        for step in range(self.steps):
            t = step % len(LM_TASKS)
            rows = rng.sample(data[list(LM_TASKS)[t]][0], self.batch_size)
            loss = self._loss(model, _collate(rows), t)[0]
            if aux > 0:
                loss = loss + aux * model.aux_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(others + routers, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        scores: dict[str, dict[str, float]] = {"eval": {}, "test": {}}
        model.eval()
        with torch.no_grad():
            for t, task in enumerate(LM_TASKS):
                for split, rows in (("eval", data[task][1]), ("test", data[task][2])):
                    scores[split][task] = self._loss(model, _collate(rows), t)[1]
        return scores, train_s

    @staticmethod
    def _loss(model, batch: dict[str, torch.Tensor], task: int) -> tuple[torch.Tensor, float]:
        """(mean response-token cross-entropy, response-token accuracy) of one batch of a task."""
        task_ids = torch.full((batch["input_ids"].shape[0],), task, dtype=torch.long)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=task_ids).logits
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # (B, L-1, V), (B, L-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        keep = labels != -100
        acc = ((logits.argmax(-1) == labels) & keep).sum().item() / max(1, keep.sum().item())
        return loss, acc
