"""The ``molora`` logger and a warning logged once per reason (silent fallbacks to slower paths)."""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("molora")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Log ``message`` at warning level the first time it is seen in this process."""
    logger.warning(message)
