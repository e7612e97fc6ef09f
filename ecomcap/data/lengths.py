"""How long a caption may be: the data's reference length in the model's tokens (seed 001).

A fixed `max_new_tokens` is either too short for long ad captions (cut mid-phrase) or far too long
for short product titles (every beam that never ends costs decode steps). The 99th percentile of
the training references' length in the model's own tokens, plus the EOS and a margin, fits
what the data asks for. It is counted once per (dataset, tokenizer) and kept next to the dataset
(`reference_lengths.json`, keyed by the ingest fingerprint: re-ingested data is counted again);
SFT records it in the exported model, so generation on a catalogue without references uses the
length its model was trained for.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

from ecomcap.data.shards import read_references, read_report

log = logging.getLogger(__name__)
FALLBACK_NEW_TOKENS = 40  # where nothing is recorded (a base checkpoint, no references)
CACHE = "reference_lengths.json"


def tokenizer_key(tokenizer) -> str:
    """Identifies a vocabulary (class, size, a hash of the token -> id map)."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{digest}"


def reference_lengths(data_dir: str | Path, tokenizer, q: float = 0.99, chunk: int = 8192) -> dict:
    """{"p99", "max", "mean", "n", ...}: reference lengths in `tokenizer`'s tokens, cached for this
    dataset (its ingest fingerprint) and tokenizer; counted in chunks (only lengths are kept)."""
    path = Path(data_dir) / CACHE
    key = {"tokenizer": tokenizer_key(tokenizer), "data": read_report(data_dir).get("fingerprint"), "q": q}
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if all(cached.get(k) == v for k, v in key.items()):
            return cached
    except (OSError, ValueError):
        pass
    texts = [t for refs in read_references(data_dir).values() for t in refs]
    lengths: list[int] = []
    for i in range(0, len(texts), chunk):
        ids = tokenizer(texts[i:i + chunk], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        lengths.extend(map(len, ids))
    lengths = sorted(lengths) or [0]
    stats = {"p99": lengths[min(len(lengths) - 1, math.ceil(q * len(lengths)) - 1)], "max": lengths[-1],
             "mean": round(sum(lengths) / len(lengths), 2), "n": len(texts), **key}
    try:  # atomic, a temp file of its own: ranks (pods on a shared volume) that count at once
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CACHE}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(stats) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a read-only artifact: counted again next time
        log.info("reference lengths not cached in %s: %s", path.parent, exc)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
    return stats


def decode_length(data_dir: str | Path, tokenizer) -> int:
    """max_new_tokens from the data: the 99th percentile reference length + EOS + 10% (at least 4)."""
    stats = reference_lengths(data_dir, tokenizer)
    if not stats["n"]:
        return FALLBACK_NEW_TOKENS
    n = stats["p99"] + 1 + max(4, math.ceil(0.1 * stats["p99"]))
    log.info("max_new_tokens from the data: %d (99th percentile of %d references: %d tokens, longest %d)",
             n, stats["n"], stats["p99"], stats["max"])
    return n
