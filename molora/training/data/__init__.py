"""Multitask data: several datasets -> one training stream with task ids.

The pipeline is

    load_task_datasets  ->  mix_tasks  ->  tokenize_causal_lm | tokenize_chat | tokenize_classification
                        ->  DataLoader(collate_fn=MultitaskCollator(...))

Every example of the mixed stream carries an int ``task_ids`` column: the id of the task it
came from. ``MultitaskCollator`` turns it into a ``(batch,)`` long tensor, which is what
``MoLoRAModel.forward(task_ids=...)`` and the ``task`` router expect.

Task ids are the position of the task in the ordered ``dict`` of datasets: insertion order
of a user-given mapping, sorted order of the values of a ``task_column``. The mapping
``task_name -> task_id`` is returned by ``load_task_datasets`` and accepted by ``mix_tasks``.
"""

from molora.training.data.chat import MESSAGES_COLUMN, tokenize_chat
from molora.training.data.collate import MultitaskCollator
from molora.training.data.columns import IGNORE_INDEX, MIX_STRATEGIES, TASK_IDS_COLUMN
from molora.training.data.load import load_task_datasets
from molora.training.data.mix import mix_tasks, task_proportions
from molora.training.data.packing import POSITION_IDS_COLUMN, eval_carve_out, pack_rows
from molora.training.data.tokenize import tokenize_causal_lm, tokenize_classification

__all__ = [
    "IGNORE_INDEX",
    "MESSAGES_COLUMN",
    "MIX_STRATEGIES",
    "TASK_IDS_COLUMN",
    "POSITION_IDS_COLUMN",
    "MultitaskCollator",
    "eval_carve_out",
    "load_task_datasets",
    "mix_tasks",
    "pack_rows",
    "task_proportions",
    "tokenize_causal_lm",
    "tokenize_chat",
    "tokenize_classification",
]
