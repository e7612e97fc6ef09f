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


# ----------------------------------------------------------------------------- batch path
# The same rules, vectorised over many captions at once: metrics and the SCST reward tokenise
# tens of thousands of captions per call, and a per-character Python loop dominated their time.
_BMP_CLASSES = None


def _bmp_classes():
    """Class (0 drop, 1 ASCII alnum, 2 own token) of every code point below 0x10000, built once."""
    global _BMP_CLASSES
    if _BMP_CLASSES is None:
        import numpy as np

        _BMP_CLASSES = np.fromiter((_char_class(chr(c)) for c in range(0x10000)), np.uint8, 0x10000)
        _char_class.cache_clear()
    return _BMP_CLASSES


def token_spans(texts: list[str]):
    """Tokens of many texts as spans: (lower-cased joined text, its code points, token starts,
    token ends, index of the text each token belongs to).

    Texts are NFKC-normalised and joined with "\\n" (always dropped, so tokens never straddle
    two texts); ASCII letters are lower-cased in place, which keeps every position unchanged.
    """
    import numpy as np

    norm = [unicodedata.normalize("NFKC", t or "") for t in texts]
    joined = "\n".join(norm)
    # surrogatepass: a lone surrogate is one code point of class "dropped", as in `tokenize`
    cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).copy()
    cls = _bmp_classes()[np.minimum(cps, 0xFFFF)]
    astral = np.flatnonzero(cps > 0xFFFF)
    if len(astral):
        uniq, inv = np.unique(cps[astral], return_inverse=True)
        cls[astral] = np.array([_char_class(chr(c)) for c in uniq.tolist()], np.uint8)[inv]
    cps[(cps >= 65) & (cps <= 90)] += 32
    lowered = cps.tobytes().decode("utf-32-le", "surrogatepass")
    run = cls == 1
    prev_run = np.concatenate(([False], run[:-1]))
    next_run = np.concatenate((run[1:], [False]))
    starts = np.flatnonzero((cls == 2) | (run & ~prev_run))
    ends = np.flatnonzero((cls == 2) | (run & ~next_run)) + 1
    lens = np.fromiter(map(len, norm), np.int64, len(norm))
    text_start = np.cumsum(lens + 1) - (lens + 1)
    owner = np.searchsorted(text_start, starts, side="right") - 1
    return lowered, cps, starts, ends, owner


def tokenize_many(texts: list[str]) -> list[list[str]]:
    """`tokenize` of each text, computed in one vectorised pass."""
    import numpy as np

    lowered, _, starts, ends, owner = token_spans(list(texts))
    tokens = [lowered[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
    bounds = np.cumsum(np.bincount(owner, minlength=len(texts))).tolist()
    return [tokens[a:b] for a, b in zip([0] + bounds[:-1], bounds)]


def is_encodable(text: str) -> bool:
    """False for text that cannot be written as UTF-8: lone UTF-16 surrogates (``"\\ud800"`` in
    JSON decodes fine in Python, then fails in SQLite, Parquet, files and tokenisers)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str, limit: int = 200) -> str:
    """Any string made safe to write and show: lone surrogates escaped, cut to `limit` chars."""
    text = text if is_encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"
