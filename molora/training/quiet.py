"""What the libraries molora calls print during a run, kept to what the user asked for.

- datasets' and transformers' progress bars (loading and tokenizing the task files, writing a
  base built from config) show on the main process only, and only with ``train.progress_bar``:
  one bar per rank is noise. ``--no-progress`` on any ``molora`` command turns transformers' bars
  (loading weights, writing shards) off with molora's own (:func:`transformers_progress`).
- bitsandbytes logs, when it is imported on a CPU with AVX512-BF16, that it could not fetch an
  optional faster 4-bit kernel from the Hub (``kernels-community``, through the ``kernels``
  package). Its fallback kernel gives the same results, and no run here can download, so that
  one message is dropped; every other bitsandbytes message is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["library_progress", "quiet_bitsandbytes_import", "transformers_progress"]

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsCommunity(logging.Filter):
    """Drops bitsandbytes' optional-Hub-kernel message, keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNEL_MESSAGE)


def quiet_bitsandbytes_import() -> None:
    """Install the filter on bitsandbytes' CPU logger (once), before bitsandbytes is imported."""
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsCommunity) for f in logger.filters):
        logger.addFilter(_DropKernelsCommunity())


@contextmanager
def library_progress(show: bool) -> Iterator[None]:
    """datasets' and transformers' progress bars on (``show``) or off inside the block; the
    previous state is restored after it."""
    import datasets

    if show:
        yield
        return
    was_datasets = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with transformers_progress(False):
            yield
    finally:
        if was_datasets:
            datasets.enable_progress_bars()


@contextmanager
def transformers_progress(show: bool) -> Iterator[None]:
    """transformers' progress bars on (``show``) or off inside the block, restored after it
    (datasets is not imported: exports and inspection do not need it)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()
