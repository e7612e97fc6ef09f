"""Training examples from an ingested shard dataset, in a deterministic, resumable order.

Metadata (ids, references, row positions) is held in memory; image bytes are read per Parquet
row group and cached, and the epoch order shuffles row groups then rows within them, so a
large dataset streams from disk instead of being loaded whole. Order and reference choice are
pure functions of (seed, epoch), which is what makes resume exact.
"""
from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
from PIL import Image

from ecomcap.data.shards import shard_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One (image, answer) pair; `references` keeps all of the image's references. The image is
    decoded when first asked for (a step whose prompt is cached never decodes it); `load` holds
    its dataset, so an Example is not meant to be pickled (nothing sends one to another process)."""

    index: int
    image_id: str
    answer: str
    references: list[str]
    load: Callable[[], Image.Image] = field(repr=False, compare=False)
    draw: int = field(default=-1, compare=False)  # position in the run's stream of items: keys augmentation

    @cached_property
    def image(self) -> Image.Image:
        return self.load()


class ShardImages:
    """Random access to an ingested dataset's images and references, row-group cached."""

    def __init__(self, dataset_dir: str | Path, cache_groups: int = 4,
                 keep: Callable[[str], bool] | None = None):
        self.files = shard_paths(dataset_dir)
        self.ids: list[str] = []
        self.texts: list[list[str]] = []
        self.where: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        for f, path in enumerate(self.files):
            pf = pq.ParquetFile(path)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=["image_id", "texts"])
                for r, (image_id, texts) in enumerate(zip(t.column("image_id").to_pylist(),
                                                          t.column("texts").to_pylist())):
                    if keep is None or keep(image_id):
                        self.ids.append(image_id)
                        self.texts.append(texts)
                        self.where.append((f, g, r))
        self._cache: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._cache_groups = cache_groups

    def __len__(self) -> int:
        return len(self.ids)

    def image_bytes(self, i: int) -> bytes:
        f, g, r = self.where[i]
        key = (f, g)
        if key not in self._cache:
            col = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["image"]).column("image")
            self._cache[key] = col.to_pylist()
            if len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][r]

    def image(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes(i))).convert("RGB")

    def groups(self) -> list[list[int]]:
        """Row indices grouped by (file, row group), in storage order."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, (f, g, _) in enumerate(self.where):
            out.setdefault((f, g), []).append(i)
        return list(out.values())


def dev_ids(dataset_dir: str | Path, n: int, seed: int = 0) -> frozenset[str]:
    """`n` image ids of a training split held out to pick checkpoints: the smallest hashes of
    (seed, id), so the choice depends on the ids alone (not on file order) and is disjoint by id."""
    if n <= 0:
        return frozenset()
    ids = ShardImages(dataset_dir).ids
    return frozenset(sorted(ids, key=lambda i: hashlib.sha256(f"dev:{seed}:{i}".encode()).digest())[:n])


def train_and_dev(train_dir: str | Path, valid_dir: str | Path | None,
                  dev_images: int) -> tuple["ShardImages", "ShardImages | None"]:
    """(images to train on, images to pick the best checkpoint on).

    With `dev_images` > 0 the selection set is split off the training split, so the validation
    split that the gate scores on stays unseen by every training decision; 0 selects on valid.
    """
    train_all = ShardImages(train_dir)
    wanted, cap = dev_images, len(train_all) // 5  # never more than a fifth of the training images
    if dev_images > cap:
        dev_images = cap if cap >= 8 else 0
        log.warning("data.dev_images %d is more than a fifth of the %d training images: %s", wanted,
                    len(train_all), f"holding out {dev_images}" if dev_images else
                    "too few to hold any out, checkpoints are picked on valid")
    if dev_images <= 0:
        return train_all, ShardImages(valid_dir) if valid_dir else None
    dev = dev_ids(train_dir, dev_images)
    return ShardImages(train_dir, keep=lambda i: i not in dev), ShardImages(train_dir, keep=dev.__contains__)


def epoch_order(data: ShardImages, seed: int, epoch: int, expand: bool = False) -> list[tuple[int, int]]:
    """(row, reference index) pairs for one epoch: groups shuffled, rows shuffled inside.

    `expand` yields every reference of every image; otherwise one reference per image, drawn
    afresh each epoch ("multi-reference sampling").
    """
    rng = random.Random(f"{seed}:{epoch}")
    groups = data.groups()
    rng.shuffle(groups)
    order: list[tuple[int, int]] = []
    for rows in groups:
        pairs = [(i, k) for i in rows for k in range(len(data.texts[i]))] if expand else [
            (i, rng.randrange(len(data.texts[i]))) for i in rows
        ]
        rng.shuffle(pairs)
        order += pairs
    return order


def make_example(data: ShardImages, row: int, ref: int) -> Example:
    refs = data.texts[row]
    return Example(row, data.ids[row], refs[ref], refs, partial(data.image, row))
