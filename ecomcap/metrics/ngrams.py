"""The vectorised n-gram pass under CIDEr-D, BLEU-4 and ROUGE-L.

pycocoevalcap rebuilds n-gram dicts in Python for every caption pair (seconds per 5,000
images); here captions go straight from text to token ids (`encode_texts`), and an n-gram order
is one integer sort plus numpy arithmetic on the sorted rows. A `Batch` groups sentences by
unit (an image), references first; per order the distinct (n-gram, sentence) rows are sorted
so that one n-gram's rows within one unit are adjacent, which pairs candidates with references.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count

import numpy as np

from ecomcap.text import token_spans

N_ORDERS = 4


def ragged_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges [starts[i], starts[i] + lengths[i])."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def encode_texts(
    texts: Sequence[str], vocab: Mapping[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, int, Mapping[str, int]]:
    """(flat token ids, tokens per text, id bound, vocabulary) of raw captions.

    Tokenises with the metric tokeniser's vectorised path: single-character tokens (nearly all
    of Chinese text) are looked up once per distinct code point, only ASCII runs become strings.
    Without `vocab`, a new one is built; with it, unknown tokens get fresh ids past it, so they
    never match an n-gram of that vocabulary.
    """
    texts = list(texts)
    lowered, cps, starts, ends, owner = token_spans(texts)
    length = np.bincount(owner, minlength=len(texts)).astype(np.int64)
    single = (ends - starts) == 1
    s_idx, m_idx = np.flatnonzero(single), np.flatnonzero(~single)
    uniq_cp, inv = np.unique(cps[starts[s_idx]], return_inverse=True)
    s_keys = [chr(c) for c in uniq_cp.tolist()]
    m_keys = [lowered[a:b] for a, b in zip(starts[m_idx].tolist(), ends[m_idx].tolist())]
    if vocab is None:
        vocab = dict(zip(dict.fromkeys(s_keys + m_keys), count()))
    fresh: dict[str, int] = {}

    def ids(keys: list[str]) -> np.ndarray:
        out = [vocab.get(k) for k in keys]
        for i, v in enumerate(out):
            if v is None:
                out[i] = fresh.setdefault(keys[i], len(vocab) + len(fresh))
        return np.array(out, dtype=np.int64)

    tok = np.empty(len(starts), dtype=np.int64)
    tok[s_idx] = ids(s_keys)[inv] if len(s_idx) else 0
    tok[m_idx] = ids(m_keys)
    return tok, length, max(len(vocab) + len(fresh), 1), vocab


class Batch:
    """Sentences as token ids, grouped by unit: each unit's references, then its candidates.

    Built from sentences in any order (stable-sorted into that layout). Also lists every
    (candidate, reference of its unit) pair, grouped by candidate: per-candidate results
    follow `cands`, the candidates in batch order.
    """

    def __init__(self, tok, length, unit, is_cand, n_units: int, n_ids: int):
        length, unit = np.asarray(length, np.int64), np.asarray(unit, np.int64)
        tok, is_cand = np.asarray(tok, np.int64), np.asarray(is_cand, bool)
        sort_key = unit * 2 + is_cand
        if len(sort_key) > 1 and np.any(sort_key[1:] < sort_key[:-1]):
            order = np.argsort(sort_key, kind="stable")
            tok = tok[ragged_index((np.cumsum(length) - length)[order], length[order])]
            length, unit, is_cand = length[order], unit[order], is_cand[order]
        self.tok, self.length, self.unit, self.is_cand = tok, length, unit, is_cand
        self.n_units, self.n_ids = n_units, n_ids  # every id is < n_ids
        self.start = np.concatenate(([0], np.cumsum(length)))
        self.sent_of_pos = np.repeat(np.arange(len(length)), length)
        self.cands = np.flatnonzero(is_cand)
        first = np.searchsorted(unit, np.arange(n_units))
        cand_unit = unit[self.cands]
        self.n_refs = np.bincount(unit[~is_cand], minlength=n_units)[cand_unit]
        self.pair_start = np.cumsum(self.n_refs) - self.n_refs
        self.pair_cand = np.repeat(self.cands, self.n_refs)
        self.pair_ref = ragged_index(first[cand_unit], self.n_refs)
        self._slot_base = np.zeros(len(length), dtype=np.int64)
        self._slot_base[self.cands] = self.pair_start - first[cand_unit]

    def pair_slot(self, cand_sent: np.ndarray, ref_sent: np.ndarray) -> np.ndarray:
        """Index into the pair arrays of (candidate sentence, reference sentence of its unit)."""
        return self._slot_base[cand_sent] + ref_sent


def batch_from_dicts(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]]
) -> tuple[list, Batch]:
    """One unit per image (in `refs` order): its references, then its prediction, tokenised."""
    keys = list(refs)
    if len(preds) != len(refs) or any(k not in preds for k in keys):
        missing, extra = [k for k in keys if k not in preds], [k for k in preds if k not in refs]
        raise ValueError(f"predictions and references differ: missing {missing[:3]}, "
                         f"extra {extra[:3]}")
    texts: list[str] = []
    per_unit = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        ref_list = refs[key]
        if isinstance(ref_list, str) or len(ref_list) == 0:
            raise ValueError(f"image {key!r}: references must be a non-empty list of strings")
        texts.extend(ref_list)
        texts.append(preds[key])
        per_unit[i] = len(ref_list) + 1
    tok, length, n_ids, _ = encode_texts(texts)
    unit = np.repeat(np.arange(len(keys), dtype=np.int64), per_unit)
    is_cand = np.zeros(len(texts), dtype=bool)
    is_cand[np.cumsum(per_unit) - 1] = True
    return keys, Batch(tok, length, unit, is_cand, len(keys), n_ids)


@dataclass(frozen=True)
class OrderPass:
    """The n-grams of one order as distinct (n-gram, sentence) rows, sorted by n-gram, sentence."""

    k: int
    code: np.ndarray  # [G] ascending codes of the distinct n-grams; row_gram indexes it
    row_gram: np.ndarray  # [R]
    row_sent: np.ndarray  # [R]
    row_tf: np.ndarray  # [R] occurrences of the n-gram in the sentence
    row_first: np.ndarray  # [R] first occurrence of the row in `occ_pos`
    occ_pos: np.ndarray  # token position of every occurrence, grouped by row
    df: np.ndarray  # [G] units whose references contain the n-gram
    pair_cand: np.ndarray  # candidate row and reference row of the same n-gram and unit
    pair_ref: np.ndarray


def _sort_codes(code: np.ndarray, bound: int, index: np.ndarray):
    """(sorted codes, permutation), equal codes kept in position order: one int64 sort.

    `bound` exceeds every code; `index` is an arange at least as long as `code`."""
    n = len(code)
    shift = max(n - 1, 1).bit_length()
    if bound << shift < (1 << 63):
        key = (code << shift) | index[:n]
        key.sort()
        return key >> shift, key & ((1 << shift) - 1)
    perm = np.argsort(code, kind="stable")
    return code[perm], perm


def _starts(a: np.ndarray) -> np.ndarray:
    """True where `a` differs from the previous element (and at 0)."""
    return np.concatenate(([True], a[1:] != a[:-1])) if len(a) else np.zeros(0, dtype=bool)


def order_passes(
    batch: Batch, max_order: int = N_ORDERS, with_df: bool = True
) -> Iterator[OrderPass]:
    """Yield the rows of n-gram orders 1..max_order (df left empty unless `with_df`).

    An n-gram's code is (rank of its (k-1)-gram prefix) * n_ids + last token, so equal n-grams
    get equal codes with no tuples built; ranks come from the previous order's sort.
    """
    npos = len(batch.tok)
    sent_of = batch.sent_of_pos
    index = np.arange(npos, dtype=np.int64)
    pos, code, bound, rank_at = index, batch.tok, batch.n_ids, index
    remaining = batch.start[1:][sent_of] - index
    for k in range(1, max_order + 1):
        if k > 1:
            pos = pos[remaining[pos] >= k]
            code = rank_at[pos] * batch.n_ids + batch.tok[pos + k - 1]
        sorted_code, perm = _sort_codes(code, bound, index)
        occ_pos = perm if k == 1 else pos[perm]
        sent = sent_of[occ_pos]
        new_gram = _starts(sorted_code)
        gram_rank = np.cumsum(new_gram) - 1
        row_first = np.flatnonzero(new_gram | _starts(sent))
        row_tf = np.diff(row_first, append=len(sent))
        row_sent, row_gram = sent[row_first], gram_rank[row_first]
        n_grams = len(row_first) and int(gram_rank[-1]) + 1
        df, pair_cand, pair_ref = _cells(batch, new_gram[row_first], row_gram, row_sent,
                                         n_grams if with_df else -1)
        yield OrderPass(k, sorted_code[new_gram], row_gram, row_sent, row_tf, row_first, occ_pos,
                        df, pair_cand, pair_ref)
        if k < max_order:
            rank_at = np.empty(npos, dtype=np.int64)
            rank_at[occ_pos] = gram_rank
            bound = n_grams * batch.n_ids


def _cells(batch: Batch, row_new_gram, row_gram, row_sent, n_grams: int):
    """Document frequencies (if n_grams >= 0) and the (candidate row, reference row) pairs
    sharing an n-gram. A cell is one n-gram within one unit; its rows are adjacent, refs first."""
    cell_new = row_new_gram | _starts(batch.unit[row_sent])
    cell_id = np.cumsum(cell_new) - 1
    cell_first = np.flatnonzero(cell_new)
    cand_rows = np.flatnonzero(batch.is_cand[row_sent])
    cand_cell = cell_id[cand_rows]
    n_cells = len(cell_first)
    nref = np.diff(cell_first, append=len(row_sent)) - np.bincount(cand_cell, minlength=n_cells)
    df = np.zeros(0, dtype=np.int64)
    if n_grams >= 0:  # cells per n-gram, less those holding only candidates
        per_gram = np.diff(cell_id[np.flatnonzero(row_new_gram)], append=n_cells)
        df = per_gram - np.bincount(row_gram[cell_first[nref == 0]], minlength=n_grams)
    per_cand = nref[cand_cell]
    return df, np.repeat(cand_rows, per_cand), ragged_index(cell_first[cand_cell], per_cand)


