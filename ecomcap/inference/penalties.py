"""Repetition penalty and no-repeat-n-gram blocking, vectorised on the device, over a chosen history.

Two rules for which tokens count as already said:
- `generated` (default): the caption's own tokens only. The prompt's words (the instruction's
  品类/颜色/图案 …) stay free to use, and 256-1,280 repeated image-pad ids are not scanned at
  every step.
- `prompt`: HF `generate`'s rule (transformers 5.25): the repetition penalty reads the prompt
  without its left padding plus the caption; the n-gram blocker reads the whole padded row. Kept
  for comparison: under it the token ids equal `generate`'s.

The operations are `RepetitionPenaltyLogitsProcessor`'s and `NoRepeatNGramLogitsProcessor`'s
(under the prompt rule a spare column past the vocabulary absorbs ignored positions), applied
to all rows at once: no Python loop over hypotheses, no host sync. The own beam loop
(`ecomcap.inference.beam`) calls `apply_penalties`; HF `generate` paths (greedy, sampling) get
`GeneratedTokenPenalties` as a logits processor for the `generated` rule.
"""
from __future__ import annotations

from typing import Literal

import torch

PenaltyScope = Literal["generated", "prompt"]


def active(repetition_penalty, no_repeat_ngram_size) -> bool:
    return float(repetition_penalty or 1.0) != 1.0 or int(no_repeat_ngram_size or 0) > 0


def apply_penalties(scores: torch.Tensor, seq: torch.Tensor, repetition_penalty: float = 1.0,
                    no_repeat_ngram_size: int = 0, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """`scores` [R, V] (log-probs or logits) after both rules over the history `seq` [R, L];
    `ignore` [R, L] marks positions the repetition penalty does not count (left padding); given (the
    prompt rule), `seq` holds prompt ids too, which may lie past the head's vocabulary, and the work
    is done on a copy with a spare column that absorbs them. Without it (the generated rule: ids the
    head produced) in place, with no copy of the scores per decoded token."""
    rep, ngram, vocab = float(repetition_penalty or 1.0), int(no_repeat_ngram_size or 0), scores.shape[-1]
    length = seq.shape[1]
    if length == 0 or not active(rep, ngram):
        return scores
    spare = ignore is not None
    out = torch.nn.functional.pad(scores, (0, 1)) if spare else scores  # column `vocab`: ids that must not count
    if rep != 1.0:
        ids = seq.clamp(max=vocab) if spare else seq
        if ignore is not None:
            ids = ids.masked_fill(ignore, vocab)
        said = out.gather(1, ids)
        out.scatter_(1, ids, torch.where(said < 0, said * rep, said / rep))
    if ngram > 0 and length >= ngram:
        # a window whose first n-1 tokens equal the last n-1 said bans its own last token
        prefix = seq[:, length + 1 - ngram:]
        windows = seq.unfold(1, ngram, 1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        banned = torch.where(matches, -float("inf"), float("inf")).to(out.dtype)  # +inf: leaves the score as it is
        out.scatter_reduce_(1, windows[..., -1].clamp(max=out.shape[-1] - 1), banned, reduce="amin")
    return out[:, :vocab] if spare else out


def left_padding(attention_mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """[R, L] True on each row's left padding (positions before its first attended token)."""
    if attention_mask is None:
        return None
    first = (attention_mask != 0).int().argmax(dim=1, keepdim=True)
    return torch.arange(shape[1], device=attention_mask.device).unsqueeze(0) < first


class GeneratedTokenPenalties:
    """A `generate` logits processor applying both rules over the generated tokens only. The
    first call sees the prompt alone (its length is the cut); one instance per `generate` call."""

    def __init__(self, repetition_penalty: float, no_repeat_ngram_size: int):
        self.rep, self.ngram, self.prompt_len = repetition_penalty, no_repeat_ngram_size, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        return apply_penalties(scores, input_ids[:, self.prompt_len:], self.rep, self.ngram)


def hf_kwargs(kw: dict, scope: PenaltyScope) -> dict:
    """`generate` arguments for `kw` under `scope`: the `prompt` rule is `generate`'s own; the
    `generated` rule swaps its two penalties for `GeneratedTokenPenalties`."""
    rep, ngram = kw.get("repetition_penalty"), kw.get("no_repeat_ngram_size")
    if scope == "prompt" or not active(rep, ngram):
        return kw
    from transformers import LogitsProcessorList

    own = list(kw.get("logits_processor") or ()) + [GeneratedTokenPenalties(float(rep or 1.0), int(ngram or 0))]
    return {**kw, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "logits_processor": LogitsProcessorList(own)}
