"""Routers for Mixture-of-LoRA-experts layers.

A leaf package: it depends on torch only and never imports ``molora``, so the routers can be
reused (or replaced) on their own. Every router maps a token batch to a :class:`RouterOutput`.
"""

from routers.base import RouterOutput, fill_padding, route_topk, route_topp
from routers.registry import ROUTERS, build_router
from routers.soft import SoftRouter
from routers.task import TaskRouter
from routers.topk import TopKRouter
from routers.topp import TopPRouter

__all__ = [
    "ROUTERS",
    "RouterOutput",
    "SoftRouter",
    "TaskRouter",
    "TopKRouter",
    "TopPRouter",
    "build_router",
    "fill_padding",
    "route_topk",
    "route_topp",
]
