"""Losses, kept apart from rewards and loops (as self-critical.pytorch does)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ecomcap.training.collate import IGNORE


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-averaged cross-entropy over answer tokens, with label smoothing."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE, label_smoothing=label_smoothing,
    )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target token, mask of real tokens); 0 where masked.

    Selected with `torch.where`: a suppressed (-inf) logit at a padded position times a 0 mask
    would be NaN.
    """
    mask = targets != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)), mask
