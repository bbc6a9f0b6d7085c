"""ROUTERS: router name -> class, and :func:`build_router`."""

from __future__ import annotations

from torch import nn

from routers.soft import SoftRouter
from routers.task import TaskRouter
from routers.topk import TopKRouter
from routers.topp import TopPRouter

ROUTERS: dict[str, type[nn.Module]] = {"soft": SoftRouter, "topk": TopKRouter, "topp": TopPRouter, "task": TaskRouter}


def build_router(name: str, in_features: int, **kwargs) -> nn.Module:
    """Build a router by registry name.

    Args:
        name: one of ``ROUTERS``.
        in_features: size of the layer input the router sees.
        **kwargs: keyword arguments of the router class (num_experts, top_k, num_tasks, ...).

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name](in_features, **kwargs)
