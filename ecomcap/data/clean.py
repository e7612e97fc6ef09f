"""Caption cleaning rules from the seed solutions, applied per reference.

Each rule can be switched off in `CleanConfig` and every action is counted, so the ingest
report says how many references each rule touched. A reference is either kept (maybe
rewritten) or dropped with a reason code; an image whose references are all dropped is
quarantined by the caller.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from ecomcap.config import CleanConfig
from ecomcap.text import is_encodable, tokenize

SPECIAL_TOKEN = re.compile(
    r"<\|[^|<>]{1,40}\|>|</?s>|<unk>|<pad>|<image>|</?img>|\[(?:UNK|PAD|CLS|SEP|MASK)\]"
)
_FULLWIDTH_ALNUM = {
    **{0xFF10 + i: 0x30 + i for i in range(10)},
    **{0xFF21 + i: 0x41 + i for i in range(26)},
    **{0xFF41 + i: 0x61 + i for i in range(26)},
    0x3000: 0x20,  # ideographic space
}
_SPACE_NOT_BETWEEN_LATIN = re.compile(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])")
_CONSECUTIVE_LOOP = re.compile(r"(.{2,12}?)\1{3,}")
_MOJIBAKE = re.compile(r"[\u0080-\u009f\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff\ufffd]")
_SENTENCE_END = re.compile(r"[。！？!?…]|\.(?!\d)")
_CLOSERS = "”’\"')）】」』"
_STYLE = re.compile(r"\S风格")

DROP_REASONS = (
    "caption_bad_unicode",
    "caption_empty",
    "caption_garbled",
    "caption_looping",
    "caption_too_long",
    "caption_no_style",
)


@dataclass
class CleanResult:
    """The cleaned reference (None when dropped), the drop reason, and what was rewritten."""

    text: str | None
    reason: str | None = None
    changes: list[str] = field(default_factory=list)


def normalize(text: str) -> str:
    """Strip special tokens and surplus whitespace; full-width letters/digits become ASCII.

    Full-width punctuation (，。！) is kept: it is the normal form of Chinese text.
    """
    text = SPECIAL_TOKEN.sub("", text).translate(_FULLWIDTH_ALNUM)
    text = "".join(" " if ch.isspace() else ch for ch in text)
    text = re.sub(r" {2,}", " ", text).strip()
    return _SPACE_NOT_BETWEEN_LATIN.sub("", text)


def repeated_ngram_share(tokens: list[str], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier one (0 for short texts): a looping signal."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 6:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_looping(text: str, tokens: list[str], max_share: float) -> bool:
    """A unit repeated 4+ times in a row, or a high share of repeated 3-grams."""
    return bool(_CONSECUTIVE_LOOP.search(text)) or repeated_ngram_share(tokens) > max_share


def garbled_share(text: str) -> float:
    """Share of characters that are replacement chars, mojibake Latin-1, controls or private use."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    bad = sum(
        1
        for c in chars
        if _MOJIBAKE.match(c) or unicodedata.category(c) in ("Cc", "Co", "Cs")
    )
    return bad / len(chars)


def cut_truncated(text: str) -> str:
    """Cut text that stops mid-sentence back to its last sentence end.

    Acts only when the text has a sentence end somewhere but does not end with one: captions
    written without any final punctuation (common in MUGE) are left alone.
    """
    stripped = text.rstrip(_CLOSERS + " ")
    if not stripped or _SENTENCE_END.fullmatch(stripped[-1]):
        return text
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return text
    return text[: ends[-1].end()].rstrip()


def clean_reference(text: str, cfg: CleanConfig) -> CleanResult:
    """Apply the enabled rules to one reference, in a fixed order."""
    changes: list[str] = []
    if not is_encodable(text):  # always on: such text cannot be stored or tokenised
        return CleanResult(None, "caption_bad_unicode", changes)
    if cfg.normalize:
        new = normalize(text)
        if new != text:
            changes.append("normalized")
        text = new
    if cfg.drop_garbled and garbled_share(text) > cfg.garbled_max_share:
        return CleanResult(None, "caption_garbled", changes)
    tokens = tokenize(text)
    if not tokens:
        return CleanResult(None, "caption_empty", changes)
    if cfg.drop_looping and is_looping(text, tokens, cfg.looping_max_repeat_share):
        return CleanResult(None, "caption_looping", changes)
    if cfg.cut_truncated:
        new = cut_truncated(text)
        if new != text:
            changes.append("cut_truncated")
            text = new
            tokens = tokenize(text)
            if not tokens:
                return CleanResult(None, "caption_empty", changes)
    if len(tokens) > cfg.max_caption_tokens:
        return CleanResult(None, "caption_too_long", changes)
    if cfg.require_style and not _STYLE.search(text):
        return CleanResult(None, "caption_no_style", changes)
    return CleanResult(text, None, changes)


@dataclass
class CleanedRefs:
    """All references of one image after cleaning, and the image-level verdict."""

    kept: list[str]
    reason: str | None  # set when no reference survived


def clean_references(refs: list[str], cfg: CleanConfig, counts: Counter) -> CleanedRefs:
    """Clean every reference of one image and count each rule's action into `counts`.

    Duplicate references (after cleaning) are kept once: they would double-weight an n-gram.
    """
    kept: list[str] = []
    reasons: list[str] = []
    for ref in refs:
        res = clean_reference(ref, cfg)
        counts.update(res.changes)
        if res.text is None:
            counts[f"dropped_{res.reason}"] += 1
            reasons.append(res.reason or "caption_empty")
        elif res.text in kept:
            counts["dropped_duplicate_reference"] += 1
        else:
            kept.append(res.text)
    if kept:
        return CleanedRefs(kept, None)
    if not reasons:
        return CleanedRefs([], "no_captions")
    distinct = set(reasons)
    return CleanedRefs([], reasons[0] if len(distinct) == 1 else "no_valid_caption")
