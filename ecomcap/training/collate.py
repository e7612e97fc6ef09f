"""Model inputs: the chat prompt with its image, and prompt + answer for teacher forcing.

Everything is left-padded so that every answer ends at the last position: a training forward
then asks the model for logits of the last A+1 positions only (`logits_to_keep`), instead of
the full vocabulary at every prompt and image position. The processor supplies
`mm_token_type_ids`, without which Qwen2.5-VL silently falls back to 1D positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from ecomcap.errors import EcomcapError
from ecomcap.modeling.processor import eos_token_id

IGNORE = -100


class PromptBuilder:
    """Encodes images with the configured instruction through the processor's chat template."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.eos_id = eos_token_id(processor)
        self.pad_id = processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def prompts(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Left-padded prompt batch (input_ids, attention_mask, mm_token_type_ids, pixels, grid).

        Every row carries its image: a text-only batch takes another forward path through the
        VLM (no vision tower), and under DDP/ZeRO-3 ranks that take different paths wait on each
        other's collectives forever (a known hang in LLaMA-Factory/TRL), so it is refused here."""
        missing = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if missing or not images:
            raise EcomcapError(f"training batch rows {missing or 'all'} have no image: every batch must be "
                               "multimodal (text-only rows desynchronise the ranks of a multi-process run)")
        enc = self.processor(
            text=[self.text] * len(images), images=list(images), padding=True, return_tensors="pt"
        )
        return dict(enc)

    def answer_ids(self, answers: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Answer token ids, cut to `max_tokens - 1`, each closed by the end-of-turn token."""
        tok = self.processor.tokenizer
        ids = tok(list(answers), add_special_tokens=False)["input_ids"]
        return [list(x[: max_tokens - 1]) + [self.eos_id] for x in ids]


@dataclass
class AnswerBatch:
    """Prompt + answer inputs; `labels[:, -answer_len:]` holds the answers (IGNORE elsewhere)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    answer_len: int

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "AnswerBatch":
        """Non-blocking from pinned memory (the DataLoader path), an ordinary copy otherwise."""
        moved = {
            k: v.to(device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None, non_blocking=True)
            for k, v in self.inputs.items()
        }
        return AnswerBatch(moved, self.labels.to(device, non_blocking=True), self.answer_len)

    def pin_memory(self) -> "AnswerBatch":
        """(DataLoader's `pin_memory` calls this on a batch it does not know.)"""
        return AnswerBatch({k: v.pin_memory() for k, v in self.inputs.items()}, self.labels.pin_memory(),
                           self.answer_len)


def with_answers(prompts: dict[str, torch.Tensor], answers: Sequence[Sequence[int]], pad_id: int) -> AnswerBatch:
    """Append each row's answer ids after its (left-padded) prompt, left-padding to one length."""
    ids, mask, mm = prompts["input_ids"], prompts["attention_mask"], prompts.get("mm_token_type_ids")
    n, a_max = ids.shape[0], max((len(a) for a in answers), default=1)
    length = ids.shape[1] + a_max
    dev = ids.device
    out_ids = torch.full((n, length), pad_id, dtype=ids.dtype, device=dev)
    out_mask = torch.zeros((n, length), dtype=mask.dtype, device=dev)
    out_mm = torch.zeros((n, length), dtype=mm.dtype, device=dev) if mm is not None else None
    labels = torch.full((n, length), IGNORE, dtype=torch.long, device=dev)
    for i, ans in enumerate(answers):
        a = torch.as_tensor(list(ans), dtype=ids.dtype, device=dev)
        lead = a_max - len(a)
        out_ids[i, lead:] = torch.cat([ids[i], a])
        out_mask[i, lead:] = torch.cat([mask[i], torch.ones(len(a), dtype=mask.dtype, device=dev)])
        if out_mm is not None:
            out_mm[i, lead : lead + mm.shape[1]] = mm[i]
        labels[i, length - len(a):] = a
    inputs = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    inputs.update(input_ids=out_ids, attention_mask=out_mask)
    if out_mm is not None:
        inputs["mm_token_type_ids"] = out_mm
    return AnswerBatch(inputs, labels, a_max)


def answer_logits(model, batch: AnswerBatch, suppress_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, A, V] predicting the answer positions, targets [B, A] with IGNORE).

    `suppress_ids` are masked to -inf, the same token set generation suppresses.
    """
    a = batch.answer_len
    out = model(**batch.inputs, use_cache=False, logits_to_keep=a + 1)
    logits = out.logits[:, :-1].float()
    if suppress_ids:
        logits[..., list(suppress_ids)] = float("-inf")
    return logits, batch.labels[:, -a:]


def repeat_prompts(enc: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Each prompt k times in a row, with its image's patch block repeated too.

    `generate` expands images for `num_return_sequences` itself; a training forward over the K
    samples needs the expansion done by hand (pixel_values is one flat block per image).
    """
    out = {key: enc[key].repeat_interleave(k, dim=0) for key in ("input_ids", "attention_mask", "mm_token_type_ids") if key in enc}
    grid = enc["image_grid_thw"]
    blocks = torch.split(enc["pixel_values"], grid.prod(dim=-1).tolist())
    out["pixel_values"] = torch.cat([b for b in blocks for _ in range(k)])
    out["image_grid_thw"] = grid.repeat_interleave(k, dim=0)
    return out


def split_samples(seqs: torch.Tensor, eos_id: int, pad_id: int) -> tuple[list[list[int]], list[bool]]:
    """Generated tails -> token lists ending at (and including) EOS; whether each ended."""
    out, ended = [], []
    for row in seqs.tolist():
        if eos_id in row:
            out.append(row[: row.index(eos_id) + 1])
            ended.append(True)
        else:
            out.append([t for t in row if t != pad_id] or [eos_id])
            ended.append(False)
    return out, ended
