"""Does a pretrained tokenizer read Chinese queries? An English-only vocabulary (the 32k
SentencePiece of google/siglip-base-patch16-224) maps most Chinese characters to its unknown id:
every query then embeds nearly alike, and fine-tuning cannot help (the unknown id is one row of
the embedding table). Checked on a few product queries when such a tokenizer is loaded, so a run
stops with one line instead of training for hours on unknown tokens."""
from __future__ import annotations

from typing import Any, Sequence

from ecomcap.errors import EcomcapError

SAMPLE_QUERIES = ("红色连衣裙", "纯棉条纹T恤", "黑色皮革手提包")
SUGGESTED = "google/siglip-base-patch16-256-multilingual or OFA-Sys/chinese-clip-vit-base-patch16"


def unknown_share(tokenizer: Any, texts: Sequence[str]) -> float:
    """Share of the texts' non-space characters that the tokenizer maps to its unknown id. Each
    character is tokenized on its own, so an unknown run merged into one id (SentencePiece) or a
    whole unknown word (WordPiece) counts every character in it."""
    chars = [c for t in texts for c in t if not c.isspace()]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not chars:  # byte-level BPE has no unknown id
        return 0.0
    rows = tokenizer(chars, add_special_tokens=False)["input_ids"]
    return sum(unk in row for row in rows) / len(chars)


def check_vocabulary(tokenizer: Any, name: str, max_share: float, texts: Sequence[str] = SAMPLE_QUERIES) -> float:
    """The unknown share of `texts`; a one-line EcomcapError above `max_share`."""
    share = unknown_share(tokenizer, texts)
    if share > max_share:
        raise EcomcapError(
            f"{name}: its tokenizer maps {share:.0%} of the characters of Chinese product queries such as "
            f"{texts[-1]} to unknown tokens (limit {max_share:.0%}); use a multilingual or Chinese checkpoint "
            f"({SUGGESTED}) or raise encoder.max_unknown_share")
    return share
