"""Padding-free SFT batches: a micro-batch's rows concatenated into one sequence.

Images of different sizes give prompts of 256-1,280 image tokens, so a left-padded batch can be
half padding, and every padded position runs through every layer. Packed, the rows' real tokens
sit end to end in one row ([1, total]); each keeps its own 3D mRoPE positions (computed per row,
as for the padded batch, so they restart at 0 at every example), and the attention stays inside
each example: transformers reads the restarts of the text position row and builds a block-diagonal
causal mask for sdpa/eager, or varlen boundaries for flash-attention 2. Loss positions are the
answer tokens only (`logits_to_keep` as indices). Loss and gradients equal the padded batch's
(`tests/test_packing.py`); a boundary never becomes a target, since every example starts with its
(unlabelled) prompt.
"""
from __future__ import annotations

import torch

from ecomcap.inference.prefill import generative_model, prompt_positions
from ecomcap.training.collate import IGNORE, AnswerBatch

ROW_KEYS = ("input_ids", "mm_token_type_ids")


def pack(model, batch: AnswerBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs of the packed row, its labels [1, total]) from a left-padded `batch`."""
    enc = batch.inputs
    keep = enc["attention_mask"].bool()
    positions = prompt_positions(generative_model(model), enc)  # [4, B, L]: text row + 3 mRoPE rows
    packed = {k: enc[k][keep].unsqueeze(0) for k in ROW_KEYS if k in enc}
    packed["position_ids"] = torch.stack([row[keep] for row in positions]).unsqueeze(1)
    packed.update({k: v for k, v in enc.items() if k not in (*ROW_KEYS, "attention_mask")})
    return packed, batch.labels[keep].unsqueeze(0)


def packed_answer_hidden(model, batch: AnswerBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's output at each position whose next token is an answer token [1, K, ...], those
    tokens [1, K]): the forward of the packed row, the head applied at those K positions only."""
    inputs, labels = pack(model, batch)
    before = (labels[0, 1:] != IGNORE).nonzero().squeeze(-1)
    out = model(**inputs, use_cache=False, logits_to_keep=before)
    return out.logits, labels[:, before + 1]
