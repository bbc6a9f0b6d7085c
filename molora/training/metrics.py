"""The metrics log of a training run, ``metrics.jsonl``: one JSON object per line,
``{"type": "train", "step", "loss", "aux_loss", "lr_<group>", "epoch", "time"}`` and
``{"type": "eval", "step", "tasks": {task: {"loss", "accuracy", "examples", "tokens"}},
"routing": {task: {layer: {"load": [N], "gates": [N], "tokens", "entropy", "max_gate"}}}}``,
and at each log step ``{"type": "routing_health", "step", "layers": {layer: {"all": {...},
"tasks": {task: {...}}}}, "summary": {...}}`` (:mod:`molora.routing_health`).

A non-finite number is written as ``null`` (JSON has no NaN; a run stops at the first
non-finite loss anyway). A run killed while appending leaves a partial last line: :func:`read_metrics` drops it (and
``--resume`` rewrites the log without it); a bad line anywhere else is an error naming it.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Any

from molora.atomic import DiskFullError, atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, tolerating a partial last line (a kill mid-write).

    Args:
        path: the ``metrics.jsonl`` file.

    Returns:
        The parsed records, in order; a last line that is not a JSON object is dropped.

    Raises:
        ValueError: a line other than the last is not a JSON object (named by file and line).
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # the partial last line of an interrupted write
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from e
        if not isinstance(record, dict):
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


class MetricsLog:
    """Append-only JSONL log, written by the main process only.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: whether this process writes (the main process).
        keep_until: resuming from this step: keep the records up to it and drop what the
            interrupted run logged after its checkpoint (and a partial last line).
            None: a fresh run, start empty.
        sinks: objects with ``write(record)`` that receive every record written here
            (TensorBoard: :mod:`molora.training.reporting`), and ``close()``.
    """

    def __init__(self, path: Path, enabled: bool, *, keep_until: int | None, sinks: list[Any] | None = None):
        self.path, self.enabled = path, enabled
        self.sinks = list(sinks or []) if enabled else []
        if not enabled:
            return
        if keep_until is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and pass it to the sinks (no-op on other processes)."""
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(_finite(record), allow_nan=False) + "\n")
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                step = f" at step {record['step']}" if "step" in record else ""
                raise DiskFullError(
                    e.errno,
                    f"cannot append to the metrics log {str(self.path)!r}{step}: the disk is full ({e.strerror}); "
                    "free space, then continue the run with --resume (it restarts from the last checkpoint "
                    "and drops a partly written last line)",
                ) from e
            for sink in self.sinks:
                sink.write(record)

    def report(self, record: dict[str, Any]) -> None:
        """Pass ``record`` to the sinks only (records kept in another file, e.g. eval samples)."""
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Close the sinks (the JSONL file is opened per write)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
