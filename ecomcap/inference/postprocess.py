"""Caption clean-up after decoding: the same normalisation the training references got.

Strip special tokens and spaces between CJK characters, collapse a phrase repeated back to back
(a common decoding failure), and turn full-width letters/digits and unit symbols (㎝, ㎏) into
ASCII. Each step can be switched off in `PostprocessConfig`.
"""
from __future__ import annotations

import re
import unicodedata

from ecomcap.config import PostprocessConfig
from ecomcap.data.clean import SPECIAL_TOKEN, normalize

_REPEAT = re.compile(r"(.{2,}?)\1+")
_REPEAT_CHAR = re.compile(r"([^\x00-\x7f])\1{2,}")
_UNITS = re.compile(r"[\u3380-\u33ff]")


def _keep_numbers(m: re.Match) -> str:
    unit = m.group(1)
    return m.group() if unit.isascii() else unit  # "10000", "abab": not a looping phrase


def collapse_repeats(text: str) -> str:
    """"简约百搭简约百搭" -> "简约百搭"; a CJK character repeated 3+ times -> once."""
    prev = None
    while prev != text:
        prev, text = text, _REPEAT.sub(_keep_numbers, text)
    return _REPEAT_CHAR.sub(r"\1", text)


def postprocess(text: str, cfg: PostprocessConfig | None = None) -> str:
    cfg = cfg or PostprocessConfig()
    if cfg.strip:
        text = normalize(text) if cfg.normalize_width else SPECIAL_TOKEN.sub("", text).strip()
    if cfg.normalize_width:
        text = _UNITS.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
    if cfg.collapse_repeats:
        text = collapse_repeats(text)
    return text
