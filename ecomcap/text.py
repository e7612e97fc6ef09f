"""The one metric tokeniser, shared by every metric and the SCST reward.

NFKC-normalise; a run of ASCII letters/digits is one lower-cased token; whitespace,
punctuation, symbols and control characters (Unicode Z*, P*, S*, C*) are dropped; every other
character (each CJK character) is its own token.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

_DROP_CATEGORIES = ("Z", "P", "S", "C")


@lru_cache(maxsize=65536)
def _char_class(ch: str) -> int:
    """0 = drop, 1 = ASCII alnum (joins a run), 2 = a token on its own."""
    if ch.isascii() and ch.isalnum():
        return 1
    if unicodedata.category(ch)[0] in _DROP_CATEGORIES:
        return 0
    return 2


def tokenize(text: str) -> list[str]:
    """Split a caption into metric tokens: "ＸＬ码2024新款！" -> ["xl", "码", "2024", "新", "款"]."""
    text = unicodedata.normalize("NFKC", text or "")
    tokens: list[str] = []
    run: list[str] = []
    for ch in text:
        cls = _char_class(ch)
        if cls == 1:
            run.append(ch)
            continue
        if run:
            tokens.append("".join(run).lower())
            run = []
        if cls == 2:
            tokens.append(ch)
    if run:
        tokens.append("".join(run).lower())
    return tokens


def tokenize_joined(text: str) -> str:
    """Tokens joined by single spaces: the form pycocoevalcap's scorers take."""
    return " ".join(tokenize(text))
