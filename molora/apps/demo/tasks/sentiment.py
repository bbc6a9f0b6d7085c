"""The ``sentiment`` demo task (negative / positive), read from the VADER lexicon.

The VADER lexicon of the ``nltk-vader-sentiment`` package (``vader.data.lexicon.LEXICON``,
with the package's curated corrections): each word or emoticon with its mean human rating r in
[-4, 4], label = sign(r); entries with |r| < ``SENTIMENT_MIN_ABS_RATING`` (0.5) are dropped as
neutral. Emoji descriptions (``vader.data.emoji.EMOJI``, skin-tone variants folded) are added,
rated by the mean rating of their lexicon words, with the same threshold. About 3,100 examples
per label.
"""

from __future__ import annotations

import importlib

from molora.apps.demo.tasks.common import dedupe, import_or_hint

__all__ = ["SENTIMENT_LABELS", "SENTIMENT_MIN_ABS_RATING", "sentiment_examples"]

SENTIMENT_MIN_ABS_RATING = 0.5
"""VADER ratings with |r| below this are treated as neutral and dropped."""

SENTIMENT_LABELS = ["negative", "positive"]
"""Label names of the sentiment task, in label-id order."""


def sentiment_examples() -> list[tuple[str, str]]:
    """``(text, "negative" | "positive")`` for lexicon entries and emoji descriptions.

    Raises:
        ImportError: ``nltk-vader-sentiment`` is missing (the message says how to install).
    """
    lexicon = _vader_lexicon()
    examples = [(t, _polarity(r)) for t, r in lexicon.items()]
    emoji = import_or_hint("vader.data.emoji", "nltk-vader-sentiment").EMOJI
    for description in sorted({d.split(":")[0].strip() for d in emoji.values()}):
        rated = [lexicon[w] for w in description.lower().split() if w in lexicon]
        if rated:
            examples.append((description, _polarity(sum(rated) / len(rated))))
    return dedupe([(t, y) for t, y in examples if y is not None])


def _vader_lexicon() -> dict[str, float]:
    """VADER's word/emoticon -> mean rating, with the package's curated corrections."""
    lexicon = dict(import_or_hint("vader.data.lexicon", "nltk-vader-sentiment").LEXICON)
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
