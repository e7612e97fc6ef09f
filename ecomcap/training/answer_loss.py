"""SFT's answer-only cross-entropy without the batch's logits over the whole vocabulary.

Qwen2.5-VL's head projects onto 151,936 words: for 8 answers of 64 tokens that is 78 M logits
(311 MB in fp32, plus their gradient) for one loss value. Here the forward stops at the final
hidden states of the answer positions (the head's forward is swapped for the identity while the
wrapped model runs, so DDP / PEFT / accelerate see an ordinary forward), and the loss is computed
`chunk_tokens` rows at a time, each chunk recomputed in backward (activation checkpointing):
at most chunk x vocabulary logits exist at once. On CUDA with Liger installed its fused
linear-cross-entropy kernel does the same in one kernel.

The numbers are the full path's (`answer_logits` + `sft_loss`): the same matmul per row, the
same fp32 cross-entropy, the sum divided by the answer tokens (what the token mean is, label
smoothing included). Where the head cannot be used outside its own forward (a ZeRO-3 partitioned
weight, accelerate hooks) the full path runs: under ZeRO-3 the whole batch's logits still exist.
"""
from __future__ import annotations

import functools
import importlib.util
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ecomcap.inference.prefill import generative_model
from ecomcap.training.collate import IGNORE, AnswerBatch, answer_logits
from ecomcap.training.losses import sft_loss
from ecomcap.training.packing import packed_answer_hidden


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, label_smoothing: float = 0.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """Token-mean cross-entropy of `linear(hidden, weight, bias)` against `targets` (IGNORE
    skipped), `chunk_tokens` rows of logits at a time."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_sum, h[i:i + chunk_tokens], weight, bias, t[i:i + chunk_tokens],
                                   label_smoothing, use_reentrant=False)
    return total / (t != IGNORE).sum().clamp(min=1)


def _chunk_sum(h, weight, bias, t, label_smoothing):
    # accelerate's mixed precision hands the forward's outputs back in fp32: the head's own dtype
    # again, as inside the forward (the values were computed in it)
    logits = F.linear(h.to(weight.dtype), weight, bias).float()
    return F.cross_entropy(logits, t, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")


def _head(model):
    """The output projection when it can be applied outside its forward, else None."""
    head = generative_model(model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or hasattr(head.weight, "ds_id") or hasattr(head, "_hf_hook"):
        return None
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        return None
    return head


@contextmanager
def _hidden_out(head: torch.nn.Linear):
    """While the block runs, the head returns its input: the model's `logits` are hidden states."""
    head.forward = lambda x: x
    try:
        yield
    finally:
        del head.forward


@functools.lru_cache(maxsize=8)
def _liger_for(device_type: str, label_smoothing: float):
    if device_type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, label_smoothing=label_smoothing)


def answer_loss(model, batch: AnswerBatch, label_smoothing: float = 0.0, chunk_tokens: int = 1024,
                packed: bool = False) -> torch.Tensor:
    """The SFT loss over the answer tokens; `chunk_tokens` 0 computes the whole batch's logits;
    `packed`: the rows run as one padding-free sequence (`ecomcap.training.packing`)."""
    head = _head(model) if chunk_tokens > 0 else None
    if head is None:
        logits, targets = packed_answer_hidden(model, batch) if packed else answer_logits(model, batch)
        return sft_loss(logits.float(), targets, label_smoothing)
    with _hidden_out(head):
        if packed:
            hidden, targets = packed_answer_hidden(model, batch)
        else:
            hidden, targets = answer_logits(model, batch)  # (the head returns its input: hidden states)
    fused = _liger_for(hidden.device.type, label_smoothing)  # looked up once, not per step
    if fused is not None:
        return fused(head.weight, hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype), targets.reshape(-1),
                     head.bias)
    return chunked_cross_entropy(hidden, head.weight, head.bias, targets, label_smoothing, chunk_tokens)
