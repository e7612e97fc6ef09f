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


def sequence_logprob(token_lp: torch.Tensor, mask: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    """Per-sequence log-likelihood of the sampled tokens (optionally divided by length)."""
    total = token_lp.sum(dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1) if length_normalize else total


def scst_loss(seq_logprob: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """Policy gradient with a baseline: -E[(r - b) * log p(sample)]."""
    return -(advantage.detach() * seq_logprob).mean()


def kl_k3_sum(token_lp: torch.Tensor, ref_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the sampled tokens of the k3 estimator of KL(policy || reference) (>= 0)."""
    delta = torch.where(mask, ref_lp - token_lp, torch.zeros_like(token_lp))
    k3 = torch.exp(delta) - delta - 1
    return (k3 * mask).sum()


def kl_penalty(token_lp: torch.Tensor, ref_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) on the sampled tokens, mean over tokens (>= 0)."""
    return kl_k3_sum(token_lp, ref_lp, mask) / mask.sum().clamp(min=1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023): -log σ(β·[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]),
    mean over pairs; the implicit rewards and how often the chosen one is ahead, for the log."""
    r_c, r_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    margin = r_c - r_r
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_chosen": float(r_c.mean().detach()), "reward_rejected": float(r_r.mean().detach()),
                  "reward_margin": float(margin.mean().detach()),
                  "reward_accuracy": float((margin > 0).float().mean())}
