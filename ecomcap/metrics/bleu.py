"""BLEU-4 exactly as pycocoevalcap's ``Bleu(4)`` computes it, on the shared n-gram pass.

Kept quirks, so numbers stay comparable with published MUGE/COCO results: reference length is
the "closest" one (ties -> shorter); per-image scores add tiny = 1e-15 / small = 1e-9 to every
n-gram precision, so a caption shorter than 4 tokens still gets a small non-zero BLEU-4; the
corpus score pools clipped counts over all images (it is not the mean of per-image scores).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from ecomcap.metrics.ngrams import N_ORDERS, Batch, OrderPass, batch_from_dicts, order_passes

TINY = 1e-15
SMALL = 1e-9


class BleuCounts:
    """Clipped n-gram matches per candidate, accumulated one order at a time."""

    def __init__(self, batch: Batch, n: int = N_ORDERS):
        self.batch, self.n = batch, n
        self.testlen = batch.length[batch.cands]
        self.guess = np.maximum(0, self.testlen[:, None] - np.arange(n)[None, :])
        self.correct = np.zeros((len(batch.cands), n), dtype=np.int64)
        self._cand_index = np.full(len(batch.length), -1, dtype=np.int64)
        self._cand_index[batch.cands] = np.arange(len(batch.cands))

    def add(self, p: OrderPass) -> None:
        """Count order p.k: each candidate n-gram clipped by its max count in one reference."""
        if p.k > self.n or len(p.pair_cand) == 0:
            return
        first = np.flatnonzero(np.r_[True, p.pair_cand[1:] != p.pair_cand[:-1]])
        rows = p.pair_cand[first]
        max_ref = np.maximum.reduceat(p.row_tf[p.pair_ref], first)
        clipped = np.minimum(p.row_tf[rows], max_ref)
        owner = self._cand_index[p.row_sent[rows]]
        self.correct[:, p.k - 1] += np.bincount(owner, clipped, len(self.testlen)).astype(np.int64)

    def closest_reflen(self) -> np.ndarray:
        """Per candidate, the reference length closest to its own (ties: the shorter)."""
        b = self.batch
        if len(b.cands) == 0:
            return np.zeros(0, dtype=np.int64)
        ref_len = b.length[b.pair_ref]
        base = int(ref_len.max()) + 1
        key = np.abs(ref_len - b.length[b.pair_cand]) * base + ref_len
        return np.minimum.reduceat(key, b.pair_start) % base

    def scores(self) -> tuple[list[float], np.ndarray]:
        """(corpus BLEU-1..n, per-candidate BLEU-1..n as an array [candidates, n])."""
        reflen = self.closest_reflen()
        per_image = _cumulative(self.correct.astype(np.float64), self.guess, self.testlen, reflen)
        corpus = _cumulative(self.correct.sum(0, keepdims=True).astype(np.float64),
                             self.guess.sum(0, keepdims=True), self.testlen.sum(keepdims=True),
                             reflen.sum(keepdims=True))
        return [float(x) for x in corpus[0]], per_image


def _cumulative(correct, guess, testlen, reflen) -> np.ndarray:
    """BLEU-1..n rows: geometric means of (correct + tiny) / (guess + small), brevity-penalised."""
    out = np.empty(correct.shape, dtype=np.float64)
    prod = np.ones(len(correct))
    for k in range(correct.shape[1]):
        prod = prod * ((correct[:, k] + TINY) / (guess[:, k] + SMALL))
        out[:, k] = prod ** (1.0 / (k + 1))
    ratio = (testlen + TINY) / (reflen + SMALL)
    short = ratio < 1
    out[short] *= np.exp(1 - 1 / ratio[short])[:, None]
    return out


def bleu(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = N_ORDERS
) -> tuple[float, np.ndarray]:
    """(corpus BLEU-n, per-image BLEU-n in `refs` order), n <= 4; pycocoevalcap's 'closest'."""
    if not 1 <= n <= N_ORDERS:
        raise ValueError(f"BLEU order must be 1..{N_ORDERS}")
    _, batch = batch_from_dicts(preds, refs)
    counts = BleuCounts(batch, n)
    for p in order_passes(batch, n):
        counts.add(p)
    corpus, per_image = counts.scores()
    return corpus[n - 1], per_image[:, n - 1]
