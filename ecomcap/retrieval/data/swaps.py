"""Attribute-swapped captions: compositional hard negatives (NegCLIP-style) and the probe that
tells whether an encoder sees an attribute at all.

A caption names attribute words from a vocabulary (field -> words: colour, pattern, category,
brand). Swapping one word for another of the same field gives a caption that is wrong about
exactly one thing; an encoder that scores the right caption above it, image by image, can tell
that attribute apart. Words are matched as substrings (Chinese has no spaces); a longer word is
tried before a shorter one it contains, and brand words (ASCII) case-insensitively.
"""
from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

Vocab = Mapping[str, Sequence[str]]


def synthetic_vocab() -> dict[str, list[str]]:
    """The synthetic set's attribute words, as its captions write them."""
    from ecomcap.data.synth_draw import BRANDS, CATEGORIES, COLOURS, PATTERNS

    return {"category": list(CATEGORIES), "colour": list(COLOURS), "pattern": list(PATTERNS),
            "brand": list(BRANDS)}


def _pattern(words: Sequence[str]) -> re.Pattern:
    ordered = sorted(set(words), key=len, reverse=True)  # longest first: "深红色" before "红色"
    return re.compile("|".join(re.escape(w) for w in ordered), re.IGNORECASE)


class AttributeSwapper:
    """Finds attribute words in a caption and swaps one for another of its field."""

    def __init__(self, vocab: Vocab):
        self.vocab = {f: list(dict.fromkeys(ws)) for f, ws in vocab.items() if len(set(ws)) >= 2}
        self._res = {f: _pattern(ws) for f, ws in self.vocab.items()}

    def found(self, text: str) -> dict[str, str]:
        """field -> the first word of that field the caption names (as the vocabulary spells it)."""
        out = {}
        for f, rx in self._res.items():
            m = rx.search(text)
            if m:
                out[f] = next(w for w in self.vocab[f] if w.lower() == m.group(0).lower())
        return out

    def mentioned(self, text: str) -> dict[str, set[str]]:
        """field -> every word of that field the caption names (as the vocabulary spells them)."""
        out: dict[str, set[str]] = {}
        for f, rx in self._res.items():
            for m in rx.findall(text):
                out.setdefault(f, set()).add(next(w for w in self.vocab[f] if w.lower() == m.lower()))
        return out

    def swap(self, text: str, field: str, rng: random.Random, avoid: str | None = None) -> str | None:
        """`text` with every mention of its `field` word replaced by another word of the field
        (never `avoid`, e.g. the image's true value); None when the caption names no such word."""
        word = self.found(text).get(field)
        if word is None:
            return None
        choices = [w for w in self.vocab[field] if w.lower() not in {word.lower(), (avoid or "").lower()}]
        if not choices:
            return None
        new = rng.choice(choices)
        return re.sub(re.escape(word), lambda _: new, text, flags=re.IGNORECASE)

    def negatives(self, text: str, n: int, rng: random.Random) -> list[str]:
        """Up to `n` distinct one-attribute swaps of `text`, fields taken in turn (random order)."""
        fields = [f for f in self.found(text)]
        rng.shuffle(fields)
        out: list[str] = []
        for i in range(4 * n):
            if len(out) >= n or not fields:
                break
            neg = self.swap(text, fields[i % len(fields)], rng)
            if neg is not None and neg not in out:
                out.append(neg)
        return out

    def strip(self, text: str, fields: Sequence[str]) -> str:
        """`text` without any word of `fields` (what a scorer blind to them must not judge)."""
        for f in fields:
            if f in self._res:
                text = self._res[f].sub("", text)
        return text
