"""Contrastive losses over a batch of B (query, item) pairs plus extra items (hard negatives).

`pos[i, j]` is True when item column j is a positive of query i (its own item j = i, and any
other column that is also one of its ground-truth items: false-negative masking). Columns
B..M-1 are mined negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, d: torch.Tensor, pos: torch.Tensor, log_scale: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE: query->items (all M columns) and item->queries (the B pair items)."""
    b = q.shape[0]
    logits = log_scale.exp() * q @ d.T
    eye = torch.eye(b, logits.shape[1], dtype=torch.bool, device=q.device)
    others = pos & ~eye  # other positives are neither targets nor negatives
    target = torch.arange(b, device=q.device)
    l_qd = F.cross_entropy(logits.masked_fill(others, float("-inf")), target)
    l_dq = F.cross_entropy(logits[:, :b].T.masked_fill(others[:, :b].T, float("-inf")), target)
    return (l_qd + l_dq) / 2, {"in_batch_acc": _acc(logits, pos)}


def sigmoid_loss(q: torch.Tensor, d: torch.Tensor, pos: torch.Tensor, log_scale: torch.Tensor,
                 bias: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """SigLIP's pairwise sigmoid loss, summed over pairs and divided by the batch size."""
    logits = log_scale.exp() * q @ d.T + bias
    labels = pos.float() * 2 - 1
    loss = -F.logsigmoid(labels * logits).sum() / q.shape[0]
    return loss, {"in_batch_acc": _acc(logits, pos)}


def _acc(logits: torch.Tensor, pos: torch.Tensor) -> float:
    """Share of queries whose best-scoring column in the batch is a positive."""
    with torch.no_grad():
        best = logits.argmax(dim=1)
        return float(pos[torch.arange(len(best)), best].float().mean())
