"""ROUGE-L exactly as pycocoevalcap's ``Rouge`` computes it, with a vectorised LCS.

pycocoevalcap per image: LCS with every reference, precision and recall maxed *separately*
over the references, F with beta = 1.2; corpus = mean over images. It splits captions with
``split(" ")``, so an empty caption is one empty token: empty vs empty scores 1, empty vs
anything else 0. We keep that.

LCS: bit-parallel (Hyyro 2004) over the candidate's token positions in a uint64 word, one
numpy step per reference position for all (candidate, reference) pairs at once. Candidates
longer than 64 tokens fall back to the same algorithm on Python integers.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from ecomcap.metrics.ngrams import Batch, OrderPass, batch_from_dicts, order_passes, ragged_index

BETA = 1.2
_WORD = 64


def lcs_python(a: Sequence, b: Sequence) -> int:
    """LCS length of two token sequences (bit-parallel on Python ints; any length)."""
    masks: dict = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def pair_lcs(batch: Batch, unigrams: OrderPass) -> np.ndarray:
    """LCS length of every (candidate, reference) pair of the batch (pair order)."""
    b, p = batch, unigrams
    cand_len, ref_len = b.length[b.pair_cand], b.length[b.pair_ref]
    n_pairs = len(cand_len)
    in_pos = p.occ_pos - b.start[b.sent_of_pos[p.occ_pos]]
    bits = np.left_shift(np.uint64(1), np.minimum(in_pos, _WORD - 1).astype(np.uint64))
    row_mask = np.bitwise_or.reduceat(bits, p.row_first) if len(bits) else bits
    # The matrix of the DP: for each pair and reference position j, which candidate
    # positions hold the reference's token j. Pairs sorted by reference length (longest
    # first), stored position-major, so step j reads one contiguous prefix.
    order = np.argsort(-ref_len, kind="stable")
    rank = np.empty(n_pairs, dtype=np.int64)
    rank[order] = np.arange(n_pairs)
    max_len = int(ref_len.max()) if n_pairs else 0
    active = np.cumsum(np.bincount(ref_len, minlength=max_len + 1)[::-1])[::-1][1:]
    col = np.cumsum(active) - active
    occ = ragged_index(p.row_first[p.pair_ref], p.row_tf[p.pair_ref])
    slot = np.repeat(b.pair_slot(p.row_sent[p.pair_cand], p.row_sent[p.pair_ref]),
                     p.row_tf[p.pair_ref])
    match = np.zeros(int(active.sum()), dtype=np.uint64)
    match[col[in_pos[occ]] + rank[slot]] = np.repeat(row_mask[p.pair_cand], p.row_tf[p.pair_ref])
    v = np.full(n_pairs, np.iinfo(np.uint64).max, dtype=np.uint64)
    for j in range(max_len):
        a = int(active[j])
        head = v[:a]
        u = head & match[col[j]:col[j] + a]
        v[:a] = (head + u) | (head - u)
    m = cand_len[order]
    low = np.where(m >= _WORD, np.iinfo(np.uint64).max,
                   np.left_shift(np.uint64(1), np.minimum(m, _WORD - 1).astype(np.uint64)) - 1)
    lcs = np.empty(n_pairs, dtype=np.int64)
    lcs[order] = np.minimum(m, _WORD) - np.bitwise_count(v & low).astype(np.int64)
    for i in np.flatnonzero(cand_len > _WORD):
        c, r = b.pair_cand[i], b.pair_ref[i]
        lcs[i] = lcs_python(b.tok[b.start[c]:b.start[c + 1]].tolist(),
                            b.tok[b.start[r]:b.start[r + 1]].tolist())
    return lcs


def rouge_scores(batch: Batch, unigrams: OrderPass) -> np.ndarray:
    """Per-candidate ROUGE-L (batch candidate order) from the batch's unigram pass."""
    b = batch
    if len(b.cands) == 0:
        return np.zeros(0)
    cand_len, ref_len = b.length[b.pair_cand], b.length[b.pair_ref]
    lcs = pair_lcs(b, unigrams)
    lcs[(cand_len == 0) & (ref_len == 0)] = 1  # "".split(" ") == [""] on both sides
    prec = np.maximum.reduceat(lcs / np.maximum(cand_len, 1), b.pair_start)
    rec = np.maximum.reduceat(lcs / np.maximum(ref_len, 1), b.pair_start)
    beta2 = BETA**2
    ok = (prec != 0) & (rec != 0)
    num = (1 + beta2) * prec * rec
    return np.divide(num, rec + beta2 * prec, out=np.zeros_like(num), where=ok)


def rouge_l(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]]
) -> tuple[float, np.ndarray]:
    """(mean ROUGE-L, per-image ROUGE-L in `refs` order), as pycocoevalcap's Rouge."""
    _, batch = batch_from_dicts(preds, refs)
    scores = rouge_scores(batch, next(order_passes(batch, 1)))
    return (float(np.mean(scores)) if len(scores) else 0.0), scores
