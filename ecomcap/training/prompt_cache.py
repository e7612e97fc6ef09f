"""Processed prompts of training images, kept across epochs.

An SFT run sees every image once per epoch (15 epochs in the first run), and each time the same
work turns it into model inputs: JPEG decode, resize, normalise, patchify, the chat template's
image tokens. That is ~8% of a tiny-model step on CPU. Like LLaMA-Factory's / ms-swift's
pre-tokenised datasets, but in memory and bounded: each row's processor output (its token ids,
`mm_token_type_ids`, pixel patches, grid) is kept, least recently used first out beyond
`max_bytes`, and a batch is put together from the rows as the processor would (left padding).
A catalogue that does not fit simply recomputes what fell out.

The split-and-collate round trip is checked against the processor's own batch once, on the first
batch; a processor whose outputs it does not know (other keys, other padding) turns the cache off
with a warning instead of feeding the model something different.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
from PIL import Image

from ecomcap.training.collate import PromptBuilder

log = logging.getLogger(__name__)
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # [rows, length], left-padded
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # patches of all images in row order; [rows, 3]
Row = dict[str, torch.Tensor]


class PromptCache:
    """`prompts(keys, load)` = `builder.prompts(load(missing keys))`, from cached rows when held."""

    def __init__(self, builder: PromptBuilder, max_bytes: int):
        self.builder, self.max_bytes = builder, max_bytes
        self.enabled = max_bytes > 0
        self._rows: OrderedDict[Hashable, Row] = OrderedDict()
        self._bytes = 0
        self._checked = False
        self.hits = self.misses = 0

    def prompts(self, keys: Sequence[Hashable], load: Callable[[list[Hashable]], list[Image.Image]]) -> Row:
        """The left-padded prompt batch of the images behind `keys` (`load` decodes the keys given)."""
        if not self.enabled:
            return self.builder.prompts(load(list(keys)))
        missing = [k for k in dict.fromkeys(keys) if k not in self._rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[Hashable, Row] = {}
        if missing:
            out = self.builder.prompts(load(missing))
            rows = split_rows(out)
            if rows is None or (not self._checked and not _same(collate(rows, self._pad_id()), out)):
                self._turn_off(sorted(out))
                return out if missing == list(keys) else self.builder.prompts(load(list(keys)))
            self._checked = True
            fresh = dict(zip(missing, rows))
        batch = [fresh[k] if k in fresh else self._rows[k] for k in keys]
        for k in keys:
            if k in self._rows:
                self._rows.move_to_end(k)
        for k, row in fresh.items():
            self._keep(k, row)
        return collate(batch, self._pad_id())

    def _pad_id(self) -> int:
        pad = self.builder.processor.tokenizer.pad_token_id
        return self.builder.pad_id if pad is None else pad

    def _keep(self, key: Hashable, row: Row) -> None:
        size = sum(t.numel() * t.element_size() for t in row.values())
        if size > self.max_bytes:
            return
        self._rows[key] = row
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old.values())

    def _turn_off(self, keys: list[str]) -> None:
        log.warning("prompt cache off: this processor's outputs (%s) are not the token/pixel layout the cache "
                    "splits and rebuilds exactly; every step runs the processor", ", ".join(keys))
        self.enabled = False
        self._rows.clear()
        self._bytes = 0


def split_rows(batch: Row) -> list[Row] | None:
    """One processor batch -> its rows (padding dropped, each image's patches); None if the batch
    has keys or shapes this does not know."""
    if set(batch) - set(TOKEN_KEYS) - set(IMAGE_KEYS) or not {"input_ids", "attention_mask"} <= set(batch):
        return None
    mask = batch["attention_mask"]
    n = mask.shape[0]
    grid = batch.get("image_grid_thw")
    pixels = batch.get("pixel_values")
    if (pixels is None) != (grid is None) or (grid is not None and (grid.shape[0] != n or pixels.dim() != 2)):
        return None
    if grid is not None and int(grid.prod(-1).sum()) != pixels.shape[0]:
        return None
    sizes = grid.prod(-1).tolist() if grid is not None else []
    patches = torch.split(pixels, sizes) if grid is not None else [None] * n
    rows = []
    for i in range(n):
        keep = mask[i].bool()
        if not bool(keep[int((~keep).sum()):].all()):  # not left padding
            return None
        row = {k: batch[k][i][keep].clone() for k in TOKEN_KEYS if k in batch}
        if grid is not None:
            row["pixel_values"], row["image_grid_thw"] = patches[i].clone(), grid[i : i + 1].clone()
        rows.append(row)
    return rows


def collate(rows: Sequence[Row], pad_id: int) -> Row:
    """Rows -> a batch as the processor makes it: token rows left-padded (pad id, mask 0, type 0),
    pixel patches and grids concatenated in row order."""
    length = max(r["input_ids"].shape[0] for r in rows)
    out: Row = {}
    for k in TOKEN_KEYS:
        if k not in rows[0]:
            continue
        fill = pad_id if k == "input_ids" else 0
        t = torch.full((len(rows), length), fill, dtype=rows[0][k].dtype)
        for i, r in enumerate(rows):
            t[i, length - r[k].shape[0]:] = r[k]
        out[k] = t
    for k in IMAGE_KEYS:
        if k in rows[0]:
            out[k] = torch.cat([r[k] for r in rows])
    return out


def _same(a: Row, b: Row) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
