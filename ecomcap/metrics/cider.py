"""CIDEr-D (pycocoevalcap's ``Cider``: n = 1..4, sigma = 6, clipped counts, x10, df from the
references) and the corpus-df scorer for the SCST reward, on the shared n-gram pass.

Scores equal pycocoevalcap's up to float summation order.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from ecomcap.metrics.ngrams import (
    N_ORDERS,
    Batch,
    OrderPass,
    batch_from_dicts,
    encode_texts,
    order_passes,
    ragged_index,
)

SIGMA = 6.0

def sentence_norms(p: OrderPass, weight: np.ndarray, n_sent: int) -> tuple[np.ndarray, np.ndarray]:
    """(tf-idf value per row, its sentence's vector norm per sentence) for one order."""
    vec = p.row_tf * weight[p.row_gram]
    return vec, np.sqrt(np.bincount(p.row_sent, vec * vec, minlength=n_sent))


class CiderSums:
    """CIDEr-D similarities per (candidate, reference) pair, accumulated one order at a time.

    `ref_norm` ([references, orders], batch order) supplies cached reference norms; then the
    weights of n-grams found in no candidate are never read.
    """

    def __init__(self, batch: Batch, sigma: float = SIGMA, ref_norm: np.ndarray | None = None):
        self.batch, self.ref_norm = batch, ref_norm
        # pycocoevalcap's caption "length" counts bigrams, not tokens.
        bigrams = np.maximum(batch.length - 1, 0).astype(np.float64)
        delta = bigrams[batch.pair_cand] - bigrams[batch.pair_ref]
        self.penalty = np.e ** (-(delta**2) / (2 * sigma**2))
        self.sim = np.zeros(len(delta))
        self.orders = 0

    def add(self, p: OrderPass, weight: np.ndarray) -> None:
        """Add one order, `weight` being tf-idf's idf per n-gram (ref_len - log df)."""
        b = self.batch
        vec, norm = sentence_norms(p, weight, len(b.length))
        if self.ref_norm is not None:
            norm[~b.is_cand] = self.ref_norm[:, p.k - 1]
        v_c, v_r = vec[p.pair_cand], vec[p.pair_ref]
        slot = b.pair_slot(p.row_sent[p.pair_cand], p.row_sent[p.pair_ref])
        dot = np.bincount(slot, np.minimum(v_c, v_r) * v_r, len(self.sim)).astype(np.float64)
        n_c, n_r = norm[b.pair_cand], norm[b.pair_ref]
        ok = (n_c != 0) & (n_r != 0)
        np.divide(dot, n_c * n_r, out=dot, where=ok)
        self.sim += dot * self.penalty
        self.orders += 1

    def scores(self) -> np.ndarray:
        """Per candidate: mean over orders, mean over references, x10."""
        b = self.batch  # every candidate has a reference, so no reduceat segment is empty
        per_cand = np.add.reduceat(self.sim, b.pair_start) if len(b.cands) else np.zeros(0)
        return per_cand / max(self.orders, 1) / b.n_refs * 10.0


def self_df_weights(p: OrderPass, n_units: int) -> np.ndarray:
    """idf from the scored set's own references, as pycocoevalcap does."""
    return np.log(float(max(n_units, 1))) - np.log(np.maximum(1.0, p.df))


def cider_d(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], sigma: float = SIGMA
) -> tuple[float, np.ndarray]:
    """(corpus CIDEr-D, per-image scores in `refs` order); df from `refs`, as pycocoevalcap."""
    _, batch = batch_from_dicts(preds, refs)
    sums = CiderSums(batch, sigma)
    for p in order_passes(batch):
        sums.add(p, self_df_weights(p, batch.n_units))
    scores = sums.scores()
    return (float(np.mean(scores)) if len(scores) else 0.0), scores


class CiderD:
    """CIDEr-D with document frequencies fixed by a reference corpus (the SCST reward).

    Built once from the training references (ref_len = log(number of images)): caches their
    token ids and tf-idf norms, and per order the sorted codes and df of n-grams with df >= 2.
    Rarer ones need no table: df 0 and 1 weigh the same, and no n-gram is commoner than its
    prefix. `score_ids` scores candidates against the cached references of their image ids.
    """

    def __init__(self, corpus: Mapping[Hashable, Sequence[str]], sigma: float = SIGMA):
        self.sigma = sigma
        self._ids = {key: i for i, key in enumerate(corpus)}
        self.n_docs = len(self._ids)
        if self.n_docs == 0:
            raise ValueError("CiderD needs a non-empty reference corpus")
        self.ref_len = float(np.log(float(self.n_docs)))
        sentences = [r for refs in corpus.values() for r in refs]
        self._img_nref = np.fromiter(map(len, corpus.values()), np.int64, self.n_docs)
        self._img_first = np.cumsum(self._img_nref) - self._img_nref
        self._tok, self._len, self._n_ids, self._vocab = encode_texts(sentences)
        self._start = np.cumsum(self._len) - self._len
        unit = np.repeat(np.arange(self.n_docs), self._img_nref)
        batch = Batch(self._tok, self._len, unit, np.zeros(len(unit), bool), self.n_docs,
                      self._n_ids)
        self._tables: list[tuple[np.ndarray, np.ndarray]] = []
        self._ref_norm = np.zeros((len(self._len), N_ORDERS))
        new_rank = np.zeros(0, dtype=np.int64)  # previous order: full rank -> table rank
        for p in order_passes(batch):
            weight = self.ref_len - np.log(np.maximum(1.0, p.df))
            self._ref_norm[:, p.k - 1] = sentence_norms(p, weight, len(self._len))[1]
            keep = p.df >= 2
            code = p.code[keep]
            if p.k > 1:  # re-point codes at the prefixes' ranks in the pruned table
                prefix, last = np.divmod(code, self._n_ids)
                code = new_rank[prefix] * self._n_ids + last
            self._tables.append((code, p.df[keep]))
            new_rank = np.cumsum(keep) - 1

    def score_ids(self, candidates: Sequence[str], ids: Sequence[Hashable]) -> np.ndarray:
        """CIDEr-D of each candidate against the corpus references of its image id."""
        if len(candidates) != len(ids):
            raise ValueError("one image id per candidate")
        try:
            img = np.fromiter((self._ids[i] for i in ids), np.int64, len(ids))
        except KeyError as exc:
            raise KeyError(f"image id {exc.args[0]!r} is not in the reference corpus") from None
        uniq, cand_unit = np.unique(img, return_inverse=True)
        sent = ragged_index(self._img_first[uniq], self._img_nref[uniq])
        cand_tok, cand_len, n_ids, _ = encode_texts(candidates, self._vocab)
        tok = np.r_[self._tok[ragged_index(self._start[sent], self._len[sent])], cand_tok]
        ref_unit = np.repeat(np.arange(len(uniq)), self._img_nref[uniq])
        return self._score(tok, np.r_[self._len[sent], cand_len], ref_unit, cand_unit, n_ids,
                           self._ref_norm[sent])

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its own references (idf still from the corpus)."""
        if len(candidates) != len(references):
            raise ValueError("one reference list per candidate")
        units: dict[tuple[str, ...], int] = {}
        cand_unit = np.fromiter((units.setdefault(tuple(r), len(units)) for r in references),
                                np.int64, len(references))
        ref_sents = [r for refs in units for r in refs]
        tok, length, n_ids, _ = encode_texts(ref_sents + list(candidates), self._vocab)
        ref_unit = np.repeat(np.arange(len(units)), [len(r) for r in units])
        return self._score(tok, length, ref_unit, cand_unit, n_ids)

    def _score(self, tok, length, ref_unit, cand_unit, n_ids, ref_norm=None):
        """Scores in input order. Sentences: references, then candidates; `ref_norm`: the
        references' cached norms, if they come from the corpus."""
        if len(cand_unit) == 0:
            return np.zeros(0)
        n_units = int(cand_unit.max()) + 1
        if np.any(np.bincount(ref_unit, minlength=n_units) == 0):
            raise ValueError("every candidate needs at least one reference")
        is_cand = np.arange(len(length)) >= len(ref_unit)
        batch = Batch(tok, length, np.r_[ref_unit, cand_unit], is_cand, n_units, n_ids)
        sums = CiderSums(batch, self.sigma, ref_norm)
        prefix_rank = np.zeros(0, dtype=np.int64)
        for p in order_passes(batch, with_df=False):
            wanted = None
            if ref_norm is not None:  # only candidates' n-grams need a weight
                wanted = np.zeros(len(p.code), dtype=bool)
                wanted[p.row_gram[batch.is_cand[p.row_sent]]] = True
            df, prefix_rank = self._corpus_df(p, prefix_rank, n_ids, wanted)
            sums.add(p, self.ref_len - np.log(np.maximum(1.0, df)))
        out = np.empty(len(cand_unit))
        out[np.argsort(cand_unit, kind="stable")] = sums.scores()
        return out

    def _corpus_df(self, p: OrderPass, prefix_rank: np.ndarray, n_ids: int, wanted=None):
        """Corpus df of the batch's (wanted) n-grams, and their corpus table ranks (-1: absent).

        A wanted n-gram's prefix is wanted too (it occurs in the same candidate)."""
        table, table_df = self._tables[p.k - 1]
        if p.k == 1:
            corpus_code, known = p.code, p.code < self._n_ids
        else:
            prefix, last = np.divmod(p.code, n_ids)
            corpus_prefix = prefix_rank[prefix]
            known = (corpus_prefix >= 0) & (last < self._n_ids)
            corpus_code = corpus_prefix * self._n_ids + last
        if wanted is not None:
            known &= wanted
        rank, df = np.full(len(p.code), -1), np.zeros(len(p.code), dtype=np.int64)
        where = np.flatnonzero(known)
        if len(table) and len(where):  # queries ascend: the binary searches stay local
            query = corpus_code[where]
            idx = np.minimum(np.searchsorted(table, query), len(table) - 1)
            found = table[idx] == query
            rank[where[found]] = idx[found]
            df[where[found]] = table_df[idx[found]]
        return df, rank


def leave_one_out_baseline(scores: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per sample: the mean score of the other samples of its group (0 for a lone sample)."""
    total = np.bincount(group, scores)[group]
    n = np.bincount(group)[group]
    return np.divide(total - scores, n - 1, out=np.zeros_like(scores, dtype=float), where=n > 1)
