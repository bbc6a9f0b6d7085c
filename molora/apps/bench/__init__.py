"""Benchmarks behind ``molora bench`` and ``benchmarks/bench_*.py``: layer and training steps, and
the recipe study (router lr ratio x aux weight x router kind).

Submodules are imported on use (``molora.apps.bench.layer``, ``molora.apps.bench.train``,
``molora.apps.bench.recipes``) so that importing this package stays cheap.
"""

__all__ = ["gpu", "layer", "recipes", "recipes_demo", "recipes_lm", "train"]
