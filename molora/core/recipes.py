"""Training defaults per router kind: the router's learning-rate ratio and the balancing-loss
weight (DESIGN §5, "Defaults must let routing learn").

This file is the one place these numbers live. ``MoLoRAConfig(router_aux_loss_coef=None)``
(the default) takes :data:`AUX_LOSS_COEF`; ``molora train`` (``train.router_lr_ratio``), the
public :func:`molora.get_optimizer_param_groups` and the demo take :data:`ROUTER_LR_RATIO`.

Why a router gets its own, larger learning rate: a router starts near uniform (its logits
are ~0), and with the experts' lr it barely moves in a fine-tuning budget; N experts that
stay uniformly mixed are one LoRA with N times the parameters. Measured on a 3-task chat set
with ``router: task`` (issue 16): router lr = lr left every gate in [0.22, 0.30] (uniform
0.25, mean max gate 0.266); 20x lr and no balancing loss reached mean max gate 0.62 (largest
gate 0.995). The balancing loss halved that (0.47 with aux 0.01): it pushes every token
towards equal use of the experts, which is what a *token* router needs to avoid collapse,
and the opposite of what a *task* table is for (its tokens are routed by task, not by
content, so token balance says nothing useful about it).

The values below are what the recipe study chose (``molora bench recipes``; benchmarks/RESULTS.md,
"Recipe study"): router lr ratio {1, 5, 20, 50} x aux {0, 0.01} per router kind, chosen on the
eval split, reported on test, over 3 seeds for the finalists, on the demo's three text tasks
(60 steps) and a 4-task tiny causal LM (300 steps). Task-table routers want a large ratio
(task: 20x, 0.763 eval on the demo against 0.759 at 1x; Hydra + task tied 20x and 50x), token
routers a small one (top-k 1x: 0.745 eval, 50x: 0.698; top-p 1x and soft 5x on the LM, both
3-4 points worse at 20-50x). A balancing loss of 0.01 never beat 0 in the study, so the default
is 0 for every kind; set ``router_aux_loss_coef=0.01`` (Switch Transformer's value) when the
routing-health monitor (:mod:`molora.core.routing_health`) warns that a token router collapses,
e.g. with many experts or long runs, which the study did not cover. Change the numbers here
only, with a pointer to the table that chose them.
"""

from __future__ import annotations

__all__ = ["AUX_LOSS_COEF", "ROUTER_LR_RATIO", "default_aux_loss_coef", "default_router_lr_ratio"]

# router lr = ratio * the experts' lr (the lr of A; LoRA+ scales B separately).
ROUTER_LR_RATIO: dict[str, float] = {
    "soft": 5.0,  # token router, dense softmax over all N experts (LM study: 5x best; 20x+ worse)
    "topk": 1.0,  # token router, top-k of the softmax (Mixtral form); 20-50x made the gates jumpy
    "topp": 1.0,  # token router, smallest set with probability >= top_p (MixLoRA form)
    "task": 20.0,  # a (num_tasks, N) table per layer: few parameters, each seen by every token of its task
}

# weight of the Switch Transformer load-balancing loss (DESIGN §5) added to the model's loss.
AUX_LOSS_COEF: dict[str, float] = {
    "soft": 0.0,  # the study found no gain from 0.01 for any router kind; see the module docstring
    "topk": 0.0,
    "topp": 0.0,
    "task": 0.0,  # a per-task table gains nothing from token balancing; it only flattens the tasks' mixtures
}


def _lookup(table: dict[str, float], router: str, what: str) -> float:
    if router not in table:
        raise ValueError(f"no default {what} for router {router!r}; routers with defaults: {sorted(table)}")
    return table[router]


def default_router_lr_ratio(router: str) -> float:
    """The default router-lr ratio of a router kind (:data:`ROUTER_LR_RATIO`).

    Raises:
        ValueError: an unknown router name (the message lists the known ones).
    """
    return _lookup(ROUTER_LR_RATIO, router, "router lr ratio")


def default_aux_loss_coef(router: str) -> float:
    """The default ``router_aux_loss_coef`` of a router kind (:data:`AUX_LOSS_COEF`).

    Raises:
        ValueError: an unknown router name (the message lists the known ones).
    """
    return _lookup(AUX_LOSS_COEF, router, "balancing-loss coefficient")
