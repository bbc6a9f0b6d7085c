"""The metrics log of a training run, ``metrics.jsonl``: one JSON object per line,
``{"type": "train", "step", "loss", "aux_loss", "lr_<group>", "epoch", "time"}`` and
``{"type": "eval", "step", "tasks": {task: {"loss", "accuracy", "examples", "tokens"}},
"routing": {task: {layer: {"load": [N], "gates": [N], "tokens"}}}}``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


class MetricsLog:
    """Append-only JSONL log, written by the main process only.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: whether this process writes (the main process).
        keep_until: resuming from this step: keep the records up to it and drop what the
            interrupted run logged after its checkpoint. None: a fresh run, start empty.
    """

    def __init__(self, path: Path, enabled: bool, *, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if keep_until is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            # Resuming: drop what the interrupted run logged after the checkpoint, atomically.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_until
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (no-op on other processes)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
