"""Contrastive losses over a batch of B (query, item) pairs plus extra items (hard negatives).

`pos[i, j]` is True when item column j is a positive of query i (its own item j = i, and any
other column that is also one of its ground-truth items: false-negative masking). Columns
B..M-1 are mined negatives. `neg` are extra *texts* (attribute-swapped captions, NegCLIP-style)
that are negatives only for their own pair's item (`neg_owner[n]` = its pair row): another item
in the batch may well show what a swapped caption says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _own_negatives(d: torch.Tensor, neg: torch.Tensor, owner: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[B, N] logits of each pair item against the extra negative texts; -inf where not its own."""
    logits = scale * d @ neg.T
    mine = owner.unsqueeze(0) == torch.arange(logits.shape[0], device=d.device).unsqueeze(1)
    return logits.masked_fill(~mine, float("-inf"))


def info_nce(q: torch.Tensor, d: torch.Tensor, pos: torch.Tensor, log_scale: torch.Tensor,
             neg: torch.Tensor | None = None, neg_owner: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE: query->items (all M columns) and item->queries (the B pair items, plus
    each item's own negative texts)."""
    b = q.shape[0]
    logits = log_scale.exp() * q @ d.T
    eye = torch.eye(b, logits.shape[1], dtype=torch.bool, device=q.device)
    others = pos & ~eye  # other positives are neither targets nor negatives
    target = torch.arange(b, device=q.device)
    l_qd = F.cross_entropy(logits.masked_fill(others, float("-inf")), target)
    d_q = logits[:, :b].T.masked_fill(others[:, :b].T, float("-inf"))
    extra = {"in_batch_acc": _acc(logits, pos)}
    if neg is not None and neg.shape[0]:
        own = _own_negatives(d[:b], neg, neg_owner, log_scale.exp())
        d_q = torch.cat([d_q, own], dim=1)
        with torch.no_grad():  # share of items (with swaps) scoring their caption above every swap of it
            has = torch.isfinite(own).any(dim=1)
            wins = d_q.diagonal() > own.max(dim=1).values
            extra["swap_acc"] = float(wins[has].float().mean()) if has.any() else 0.0
    l_dq = F.cross_entropy(d_q, target)
    return (l_qd + l_dq) / 2, extra


def sigmoid_loss(q: torch.Tensor, d: torch.Tensor, pos: torch.Tensor, log_scale: torch.Tensor,
                 bias: torch.Tensor, neg: torch.Tensor | None = None, neg_owner: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """SigLIP's pairwise sigmoid loss, summed over pairs and divided by the batch size; each
    pair item's own negative texts add negative pairs."""
    logits = log_scale.exp() * q @ d.T + bias
    labels = pos.float() * 2 - 1
    loss = -F.logsigmoid(labels * logits).sum() / q.shape[0]
    if neg is not None and neg.shape[0]:
        own = log_scale.exp() * (d[neg_owner] * neg).sum(-1) + bias
        loss = loss - F.logsigmoid(-own).sum() / q.shape[0]
    return loss, {"in_batch_acc": _acc(logits, pos)}


def _acc(logits: torch.Tensor, pos: torch.Tensor) -> float:
    """Share of queries whose best-scoring column in the batch is a positive."""
    with torch.no_grad():
        best = logits.argmax(dim=1)
        return float(pos[torch.arange(len(best)), best].float().mean())
