"""Error messages of the command line in its own words.

The library's errors name Python arguments and calls (```rank```, ``method='cat'``,
``measure_gates(model, batches, by_task=True)``), which is right in Python and wrong on the
command line, where the user's handles are flags. A command passes the message of a user error
through its table here before printing it, so that every CLI error names the CLI's own flag.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["EXPORT_FLAGS", "cli_message"]

_MEASURED = "add --weights measured (the per-task gates of the run's last eval), or --weights FILE"

# (pattern, replacement) in order: whole sentences first, then argument names.
EXPORT_FLAGS: Sequence[tuple[str, str]] = (
    (r"Use measure_gates\(model, batches, by_task=True\)\.?", _MEASURED),
    (r"Measure gates per task with measure_gates\(model, batches, by_task=True\) and pass them as `weights`\.?", _MEASURED),
    (r"`task='all'` takes `weights=None` \(task router\) or per-task measured gates",
     "--task all takes no --weights (task router) or --weights measured (per-task gates)"),
    (r"`task='all'` is for export_merged_adapter; merge_and_unload takes one task",
     "--merge-into-base takes one --task, not 'all'"),
    (r"pass either `task` \(the task router's gates\) or `weights`, not both, unless `weights` is per-task measured gates",
     "give --task (the task router's gates) or --weights, not both, unless --weights measured gives per-task gates"),
    (r"merge it into the base with merge_and_unload\(task=\.\.\.\)",
     "merge it into the base with --task T --merge-into-base"),
    (r"\(config\.router='task'\)", "(molora.router=task)"),
    (r"`task=([^`]*)`", r"--task \1"),
    (r"`task='all'`", "--task all"),
    (r"`eval_batches`", "--fidelity-batches"),
    (r"`(rank|weights|task|method|target|tolerance)`=", r"--\1 "),
    (r"`(rank|weights|task|method|target|tolerance)`", r"--\1"),
    (r"\bUse rank <= ", "Use --rank <= "),
    (r"\b(method|target)='(\w+)'", r"--\1 \2"),
    (r"\brank='auto'", "--rank auto"),
    (r"(?<![-\w])rank=(\d+)", r"--rank \1"),
    (r"export with target='peft'", "export with --target peft"),
)


def cli_message(message: str, table: Sequence[tuple[str, str]]) -> str:
    """``message`` with the Python spellings of ``table`` replaced by the command line's flags.

    Args:
        message: the text of a user error raised by the library.
        table: ``(regex, replacement)`` pairs applied in order (e.g. :data:`EXPORT_FLAGS`).

    Returns:
        The message to print.
    """
    for pattern, replacement in table:
        message = re.sub(pattern, replacement, message)
    return message
