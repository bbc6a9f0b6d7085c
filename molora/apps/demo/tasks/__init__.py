"""Real-text classification tasks for ``molora demo``, read at run time from installed packages.

Nothing here is vendored: every text is read when :func:`load_demo_tasks` runs.

- ``sentiment`` (negative / positive): VADER lexicon words, emoticons and emoji descriptions
  (:mod:`~molora.apps.demo.tasks.sentiment`);
- ``topic`` (8 stdlib package families) and ``kind`` (module / class / function): docstrings of
  the standard library's own sources, with the sentences that name their label removed
  (:mod:`~molora.apps.demo.tasks.docstrings`).

Texts that occur under two labels of a task are dropped; repeated texts under one label are
kept once. Each task is class-balanced: the same number of train and of test examples per
label, drawn by ``seed`` from a sorted pool, so the split does not depend on file-system order
and train and test never share a text (:mod:`~molora.apps.demo.tasks.common`). Test takes at
most a quarter of the smallest label's pool.

Sizes with CPython 3.11 (pool before the caps; the balanced maximum is labels x smallest
label): sentiment ~3,100 per label (2 labels), topic ~165 per label (8), kind ~250 per
label (3). ``load_demo_tasks`` takes about 1-2 s (most of it parsing ~2 MB of source).
"""

from molora.apps.demo.tasks.docstrings import TOPIC_FAMILIES
from molora.apps.demo.tasks.loader import DEMO_TASK_LABELS, load_demo_tasks, minilm_model_path
from molora.apps.demo.tasks.sentiment import SENTIMENT_MIN_ABS_RATING

__all__ = [
    "DEMO_TASK_LABELS",
    "SENTIMENT_MIN_ABS_RATING",
    "TOPIC_FAMILIES",
    "load_demo_tasks",
    "minilm_model_path",
]
