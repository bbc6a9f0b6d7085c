"""TaskRouter: a learned (num_tasks, N) table of logits; every token routes by its task id."""

from __future__ import annotations

import torch
from torch import nn

from routers.base import RouterOutput, check_finite, check_normalize, check_top_k, route_topk


class TaskRouter(nn.Module):
    """logits[t] = E[task_ids[t]]; weights = softmax, or its top-k (DESIGN §4).

    Top-k gates are renormalized for k >= 2 and raw probabilities for k == 1, unless
    ``normalize_top_k`` says otherwise (as :func:`routers.route_topk`).

    Since the gates do not depend on the token, a task's gates are one (N,) vector
    (:meth:`task_weights`), which makes a per-task static merge exact.

    Args:
        in_features: accepted for a uniform constructor signature; unused.
        num_experts: N.
        num_tasks: number of task ids, valid ids are 0..num_tasks-1.
        top_k: experts per task, in [1, N]; ``None`` (default) uses all experts.
        init_std: std of the normal init of the table. Random (not zero) so that tasks
            start on different experts under top-k.
        debug: raise on NaN/inf logits.
        normalize_top_k: renormalize the chosen gates; ``None``: for k >= 2 only.
    """

    def __init__(
        self,
        in_features: int | None = None,
        *,
        num_experts: int,
        num_tasks: int,
        top_k: int | None = None,
        init_std: float = 0.02,
        debug: bool = False,
        normalize_top_k: bool | None = None,
    ):
        super().__init__()
        check_top_k(top_k, num_experts, allow_none=True)
        check_normalize(normalize_top_k)
        self.normalize_top_k = normalize_top_k
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"`num_tasks` must be an int >= 1 for the task router, got {num_tasks!r}")
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.top_k = None if top_k is None or top_k >= num_experts else top_k
        self.debug = debug
        self.table = nn.Parameter(torch.empty(num_tasks, num_experts, dtype=torch.float32))  # (tasks, N)
        nn.init.normal_(self.table, std=init_std)

    def _check_task_ids(self, task_ids: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        if task_ids is None:
            raise ValueError(
                "the task router needs `task_ids`: pass task_ids=(batch,) LongTensor to the model's "
                "forward/generate"
            )
        if task_ids.shape != (num_tokens,):
            raise ValueError(f"`task_ids` must have shape ({num_tokens},) per token, got {tuple(task_ids.shape)}")
        if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
            raise ValueError(f"`task_ids` must be an integer tensor, got dtype {task_ids.dtype}")
        # The model validates ids once per call on the host; here only host tensors (no device
        # sync) or debug mode pay for the range check, and never inside a compiled graph.
        checkable = (task_ids.device.type == "cpu" or self.debug) and not torch.compiler.is_compiling()
        if num_tokens and checkable and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(
                f"`task_ids` must be in [0, num_tasks={self.num_tasks}), got values in "
                f"[{int(task_ids.min())}, {int(task_ids.max())}]"
            )
        return task_ids

    def forward(self, x: torch.Tensor | None, task_ids: torch.Tensor | None = None) -> RouterOutput:
        num_tokens = x.shape[0] if x is not None else (0 if task_ids is None else task_ids.shape[0])
        task_ids = self._check_task_ids(task_ids, num_tokens)
        logits = self.table[task_ids.to(self.table.device).long()].float()  # (T, N)
        if self.debug:
            check_finite(logits, type(self).__name__)
        return route_topk(logits, self.top_k, self.normalize_top_k)

    @torch.no_grad()
    def task_weights(self, task: int) -> torch.Tensor:
        """(N,) float32 gates of one task, exactly those ``forward`` gives its tokens."""
        if not 0 <= int(task) < self.num_tasks:
            raise ValueError(f"`task` must be in [0, num_tasks={self.num_tasks}), got {task}")
        return route_topk(self.table[int(task)].float()[None], self.top_k, self.normalize_top_k).weights[0]

    def table_weights(self) -> torch.Tensor:
        """(num_tasks, N) float32 gates of every task at once (with the table's graph, no sync)."""
        return route_topk(self.table.float(), self.top_k, self.normalize_top_k).weights

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_experts={self.num_experts}, top_k={self.top_k}"
