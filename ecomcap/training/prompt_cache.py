"""Processed prompts of training images, kept across epochs.

An SFT run sees every image once per epoch (15 epochs in the first run), and each time the same
work turns it into model inputs: JPEG decode, resize, normalise, patchify, the chat template's
image tokens. That is ~8% of a tiny-model step on CPU. Like LLaMA-Factory's / ms-swift's
pre-tokenised datasets, but in memory and bounded: each row's processor output (its token ids,
`mm_token_type_ids`, pixel patches, grid) is kept until `max_bytes` are held, then no more rows
are admitted (the epoch order is reshuffled every epoch, so evicting would only churn: with a
catalogue larger than the budget, the share that fits is served from memory, the rest is
processed as before). Rows over `max_row_bytes` are not admitted: a real-size photo's fp32 patches
(5-10 MB) would fill a 1 GB budget with ~150 images of a catalogue of millions. A batch is put
together from the rows as the processor would (left padding).

Checked once, on the first batch: the rows split from the processor's batch rebuild that batch
bit for bit, and the first row equals what the processor gives for its image alone (a row does
not depend on its batch companions). A processor whose outputs it does not know (video keys,
`second_per_grid_ts`, right padding) turns the cache off with a warning instead of feeding the
model something different.
"""
from __future__ import annotations

import logging
from typing import Callable, Hashable, Sequence

import torch
from PIL import Image

from ecomcap.training.collate import PromptBuilder

log = logging.getLogger(__name__)
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # [rows, length], left-padded
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # patches of all images in row order; [rows, 3]
Row = dict[str, torch.Tensor]


class PromptCache:
    """`prompts(keys, load)` == `builder.prompts(load(keys))`, from held rows where it can."""

    def __init__(self, builder: PromptBuilder, max_bytes: int, max_row_bytes: int | None = None):
        self.builder, self.max_bytes, self.max_row_bytes = builder, max_bytes, max_row_bytes
        self.enabled = max_bytes > 0
        self._rows: dict[Hashable, Row] = {}
        self._bytes = 0
        self._checked = False
        self.hits = self.misses = self.too_large = 0  # rows served from memory / processed / not admitted (size)

    def prompts(self, keys: Sequence[Hashable], load: Callable[[list[Hashable]], list[Image.Image]]) -> Row:
        """The left-padded prompt batch of the images behind `keys` (`load` decodes the keys given)."""
        if not self.enabled:
            return self.builder.prompts(load(list(keys)))
        missing = [k for k in dict.fromkeys(keys) if k not in self._rows]
        fresh: dict[Hashable, Row] = {}
        if missing:
            images = load(missing)
            out = self.builder.prompts(images)
            rows = split_rows(out)
            if rows is None or (not self._checked and not self._check(out, rows, images[0])):
                self._turn_off(sorted(out))
                return out if missing == list(keys) else self.builder.prompts(load(list(keys)))
            fresh = dict(zip(missing, rows))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        # nothing held, no repeats: the processor's own batch is the batch (a full cache over a larger
        # catalogue mostly sees these; rebuilding would copy every pixel once more)
        batch = out if missing == list(keys) else collate([fresh[k] if k in fresh else self._rows[k] for k in keys],
                                                          self.builder.pad_id)
        for k, row in fresh.items():
            size = _nbytes(row)
            if self.max_row_bytes is not None and size > self.max_row_bytes:
                self.too_large += 1
            elif self._bytes + size <= self.max_bytes:  # copied: a view would keep the whole batch alive
                self._rows[k] = {name: t.clone() for name, t in row.items()}
                self._bytes += size
        return batch

    def summary(self) -> str:
        return (f"prompt cache: {self.hits} rows from memory, {self.misses} processed, {len(self._rows)} held "
                f"({self._bytes / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MB), {self.too_large} rows over the "
                "row size limit" if self.enabled else "prompt cache off")

    def _check(self, out: Row, rows: list[Row], first: Image.Image) -> bool:
        self._checked = True
        alone = split_rows(self.builder.prompts([first]))
        return _same(collate(rows, self.builder.pad_id), out) and alone is not None and _same(alone[0], rows[0])

    def _turn_off(self, keys: list[str]) -> None:
        log.warning("prompt cache off: this processor's outputs (%s) are not the token/pixel layout the cache "
                    "splits and rebuilds exactly; every step runs the processor", ", ".join(keys))
        self.enabled = False
        self._rows.clear()
        self._bytes = 0


class ImageCache:
    """Decoded training images kept across epochs, for runs that augment: a processed prompt changes
    every step then, the JPEG decode does not. Admitted until `max_bytes` are held (no eviction, as
    above)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self._bytes = max_bytes, 0
        self._images: dict[Hashable, Image.Image] = {}
        self.hits = self.misses = 0

    def get(self, key: Hashable, load: Callable[[], Image.Image]) -> Image.Image:
        img = self._images.get(key)
        if img is not None:
            self.hits += 1
            return img
        self.misses += 1
        img = load()
        size = img.width * img.height * len(img.getbands())
        if self._bytes + size <= self.max_bytes:
            img.load()
            self._images[key], self._bytes = img, self._bytes + size
        return img

    def summary(self) -> str:
        return (f"decoded-image cache (augmenting): {self.hits} images from memory, {self.misses} decoded, "
                f"{len(self._images)} held ({self._bytes / 2**20:.0f} MB)")


def _nbytes(row: Row) -> int:
    return sum(t.numel() * t.element_size() for t in row.values())


def split_rows(batch: Row) -> list[Row] | None:
    """One processor batch -> its rows (padding dropped, each image's patches, views into the
    batch where they can be); None if the batch has keys or shapes this does not know."""
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
        row = {k: batch[k][i][keep] for k in TOKEN_KEYS if k in batch}
        if grid is not None:
            row["pixel_values"], row["image_grid_thw"] = patches[i], grid[i : i + 1]
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
