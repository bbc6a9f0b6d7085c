"""Benchmarks behind ``molora bench`` and ``benchmarks/bench_*.py``: layer and training steps.

Submodules are imported on use (``molora.apps.bench.layer``, ``molora.apps.bench.train``) so that
importing this package stays cheap.
"""

__all__ = ["gpu", "layer", "train"]
