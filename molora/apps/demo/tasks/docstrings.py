"""The ``topic`` and ``kind`` demo tasks: docstrings of the standard library's own sources.

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
are dropped). With CPython 3.11: topic ~165 examples per label, kind ~250; reading them takes
about 1-2 s (most of it parsing ~2 MB of source).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from molora.apps.demo.tasks.common import dedupe

__all__ = ["KIND_LABELS", "TOPIC_FAMILIES", "kind_examples", "stdlib_docstrings", "topic_examples"]

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
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "lib2to3",
        "turtledemo",
    }
)
_SKIPPED_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING)
_MAX_CHARS = 200
_MAX_SENTENCES = 3
_MIN_CHARS = 15
# A sentence ends at . ! ? followed by space and a capital, except after "e.g." / "i.e.".
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+(?=[A-Z\"'`(])")


KIND_LABELS = ["module", "class", "function"]
"""Label names of the kind task, in label-id order."""


class _Doc(NamedTuple):
    paragraph: str  # first paragraph of the docstring, whitespace-collapsed
    package: str | None  # top-level package, None for a top-level module file
    kind: str  # "module" | "class" | "function"


def topic_examples(docs: list[_Doc]) -> list[tuple[str, str]]:
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
    return dedupe(examples)


def kind_examples(docs: list[_Doc]) -> list[tuple[str, str]]:
    """``(text, kind)`` for every docstring that does not name its kind."""
    examples = [(_summary(d.paragraph, leak=_KIND_LEAK), d.kind) for d in docs]
    return dedupe([(text, kind) for text, kind in examples if text])


def stdlib_docstrings() -> Iterator[_Doc]:
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
