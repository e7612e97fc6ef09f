"""The gallery embedding artifact: the contract between training and the vector store / search.

A directory holding
- ``vectors.npy``     float32 [N, D], L2-normalised, row i = item i
- ``items.jsonl``     one ``{"item_id", "text"}`` per row, same order
- ``images.parquet``  (item_id, image bytes as stored: JPEG/PNG)
- ``encoder/``        the encoder that made the vectors (``load_encoder`` reads it)
- ``index.json``      {"count", "dim", "item_embedding", "fusion_weight", "encoder_dir", "fingerprint",
                      "search" (the IndexConfig every reader opens it with)}

Written streaming (memory-mapped vectors, row-group Parquet), so a 1M-item catalogue fits.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from ecomcap.data.shards import RowWriter, iter_batches, read_report
from ecomcap.errors import EcomcapError

if TYPE_CHECKING:  # annotations only: the encoder pulls in transformers
    from ecomcap.retrieval.model.encoder import Encoder

IMAGES_SCHEMA = pa.schema([("item_id", pa.string()), ("image", pa.binary())])
INDEX = "index.json"
FILES = ("vectors.npy", "items.jsonl", "images.parquet", INDEX)
NORM_TOLERANCE = 1e-3


class GalleryDigest:
    """The one gallery fingerprint (index.json "fingerprint"), fed batch by batch by every writer
    (the same however the items are batched): item embedding settings, the items' ids and
    texts, and their vectors."""

    def __init__(self, mode: str, fusion_weight: float):
        self._head = f"{mode}:{fusion_weight}"
        self._items, self._vectors = hashlib.sha256(), hashlib.sha256()

    def update(self, ids: list[str], texts: list[str], vectors: np.ndarray) -> None:
        for item_id, text in zip(ids, texts):
            self._items.update(f"{item_id}\t{text}\n".encode())
        self._vectors.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self._head}|{self._items.hexdigest()}|{self._vectors.hexdigest()}".encode()).hexdigest()


@dataclass
class Gallery:
    """A loaded gallery artifact (vectors memory-mapped)."""

    path: Path
    vectors: np.ndarray
    item_ids: list[str]
    texts: list[str]
    index: dict[str, Any]
    content_hashes: list[str | None] = field(default_factory=list)  # None: written before the hashes

    @property
    def encoder_dir(self) -> Path:
        return (self.path / self.index["encoder_dir"]).resolve()

    def encoder(self, device: str | None = None) -> Encoder:
        from ecomcap.retrieval.model.encoder import load_encoder

        return load_encoder(self.encoder_dir, device=device)

    def images(self, item_ids: list[str]) -> dict[str, bytes]:
        """Image bytes of the given items (a filtered Parquet read)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(self.path / "images.parquet", filters=pc.field("item_id").isin(item_ids))
        return dict(zip(table.column("item_id").to_pylist(), table.column("image").to_pylist()))


def encoder_fingerprint(encoder_dir: str | Path) -> str:
    """Content hash of an encoder directory (weights, tokenizer, settings): vectors made by the
    same encoder are reusable, by any other are not."""
    h = hashlib.sha256()
    root = Path(encoder_dir)
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def content_hash(image: bytes, text: str) -> str:
    """What an item's vector depends on besides the encoder: its image bytes and its text."""
    return hashlib.sha256(image + b"\0" + text.encode()).hexdigest()[:32]


def _reusable(previous: str | Path | None, encoder_fp: str, mode: str, weight: float):
    """(item_id -> (content hash, row), vectors) of a previous gallery made by the same encoder
    the same way; ({}, None) when there is none or nothing of it can be reused."""
    if previous is None or not (Path(previous) / INDEX).is_file():
        return {}, None
    prev = load_gallery(previous)
    same = (prev.index.get("encoder_fingerprint") == encoder_fp and prev.index.get("item_embedding") == mode
            and prev.index.get("fusion_weight") == weight)
    if not same:
        return {}, None
    return {item_id: (h, i) for i, (item_id, h) in enumerate(zip(prev.item_ids, prev.content_hashes))}, prev.vectors


def embed_gallery(encoder_dir: str | Path, items_dir: str | Path, out_dir: str | Path,
                  batch_size: int = 128, mode: str | None = None, device: str | None = None,
                  search: dict | None = None, previous: str | Path | None = None) -> Path:
    """Embed every item of an ingested item dataset into a gallery artifact at `out_dir`;
    `search` (IndexConfig as a dict) is recorded so every reader searches it the same way.

    With `previous` (an earlier gallery of the same encoder and item embedding), an item whose
    id and content hash (image bytes + text) are unchanged keeps its vector: re-indexing a
    catalogue re-embeds only what changed. index.json "embedding" counts embedded and reused items.
    """
    from ecomcap.retrieval.model.encoder import load_encoder

    encoder = load_encoder(encoder_dir, device=device)
    mode = mode or encoder.item_embedding
    encoder_fp = encoder_fingerprint(encoder_dir)
    known, old_vectors = _reusable(previous, encoder_fp, mode, encoder.fusion_weight)
    count = int(read_report(items_dir)["rows_ok"])
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(encoder_dir, tmp / "encoder")
    dim = encoder.dim
    vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(count, dim))
    images = RowWriter(tmp, IMAGES_SCHEMA, rows_per_group=1000, single_name="images.parquet")
    digest = GalleryDigest(mode, encoder.fusion_weight)
    row = embedded = 0
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as items, \
            tqdm(total=count, desc="embed gallery", unit="item", disable=None) as bar:
        for batch in iter_batches(items_dir, ["image_id", "image", "texts"], batch_size):
            ids = batch.column("image_id").to_pylist()
            blobs = batch.column("image").to_pylist()
            texts = [t[0] if t else "" for t in batch.column("texts").to_pylist()]
            hashes = [content_hash(b, t) for b, t in zip(blobs, texts)]
            vec = np.empty((len(ids), dim), dtype=np.float32)
            fresh = []
            for j, (item_id, h) in enumerate(zip(ids, hashes)):
                seen = known.get(item_id)
                if seen is not None and seen[0] == h:
                    vec[j] = old_vectors[seen[1]]
                else:
                    fresh.append(j)
            if fresh:
                pics = [Image.open(io.BytesIO(blobs[j])).convert("RGB") for j in fresh]
                vec[fresh] = encoder.encode_items(pics, [texts[j] for j in fresh], mode=mode)
                embedded += len(fresh)
            vectors[row:row + len(ids)] = vec
            row += len(ids)
            for item_id, text, blob, h in zip(ids, texts, blobs, hashes):
                items.write(json.dumps({"item_id": item_id, "text": text, "content_hash": h}, ensure_ascii=False) + "\n")
                images.add({"item_id": item_id, "image": blob})
            digest.update(ids, texts, vec)
            bar.update(len(ids))
    if row != count:
        raise EcomcapError(f"{items_dir}: report says {count} items, shards hold {row}")
    vectors.flush()
    del vectors
    images.close()
    index = {"count": count, "dim": dim, "item_embedding": mode, "fusion_weight": encoder.fusion_weight,
             "encoder_dir": "encoder", "encoder_fingerprint": encoder_fp, "fingerprint": digest.hexdigest(),
             "embedding": {"embedded": embedded, "reused": count - embedded,
                           "previous": str(previous) if old_vectors is not None else None},
             **({"search": search} if search else {})}
    (tmp / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_gallery(path: str | Path, mmap: bool = True) -> Gallery:
    """Open a gallery artifact; raises EcomcapError when it is incomplete or inconsistent."""
    path = Path(path)
    index_file = path / INDEX
    if not index_file.is_file():
        raise EcomcapError(f"{path} is not a gallery artifact (no {INDEX})")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    vectors = np.load(path / "vectors.npy", mmap_mode="r" if mmap else None)
    rows = [json.loads(line) for line in (path / "items.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if vectors.shape != (index["count"], index["dim"]) or len(rows) != index["count"]:
        raise EcomcapError(f"{path}: vectors {vectors.shape} / items {len(rows)} do not match index.json "
                           f"(count {index['count']}, dim {index['dim']})")
    return Gallery(path, vectors, [r["item_id"] for r in rows], [r["text"] for r in rows], index,
                   [r.get("content_hash") for r in rows])


def open_gallery(root: str | Path) -> Gallery:
    root = Path(root)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise EcomcapError(f"{root} is not a gallery artifact: missing {', '.join(missing)}")
    meta = json.loads((root / INDEX).read_text(encoding="utf-8"))
    absent = [k for k in ("count", "dim", "encoder_dir", "fingerprint") if k not in meta]
    if absent:
        raise EcomcapError(f"{root}/{INDEX} lacks {', '.join(absent)}")
    gallery = load_gallery(root)
    if gallery.vectors.ndim != 2 or gallery.vectors.dtype != np.float32:
        raise EcomcapError(f"{root}/vectors.npy must be float32 [N, D], got {gallery.vectors.dtype}")
    for start in range(0, len(gallery.vectors), 65536):  # memory-mapped: check in chunks
        norms = np.linalg.norm(gallery.vectors[start:start + 65536], axis=1)
        if not np.all(np.abs(norms - 1) < NORM_TOLERANCE):
            bad = int(np.argmax(np.abs(norms - 1)))
            raise EcomcapError(f"{root}/vectors.npy rows must be L2-normalised "
                               f"(row {start + bad} has norm {norms[bad]:.4f})")
    if len(set(gallery.item_ids)) != len(gallery.item_ids):
        raise EcomcapError(f"{root}/items.jsonl has duplicate item ids")
    return gallery


def write_gallery(root: str | Path, vectors: np.ndarray, items: list[tuple[str, str]],
                  images: Iterable[tuple[str, bytes]], meta: dict) -> Path:
    """Write the four files (``meta`` adds item_embedding, fusion_weight, encoder_dir; count, dim
    and, unless given, the fingerprint are filled in) with embed_gallery's image writer and
    fingerprint, so both kinds of gallery are identified the same way."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    np.save(root / "vectors.npy", vectors)
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for item_id, text in items:
            f.write(json.dumps({"item_id": item_id, "text": text}, ensure_ascii=False) + "\n")
    writer = RowWriter(root, IMAGES_SCHEMA, rows_per_group=1000, single_name="images.parquet")
    for item_id, blob in images:
        writer.add({"item_id": item_id, "image": blob})
    writer.close()
    digest = GalleryDigest(meta.get("item_embedding", "image"), meta.get("fusion_weight", 0.5))
    digest.update([i for i, _ in items], [t for _, t in items], vectors)
    full = {"count": len(items), "dim": int(vectors.shape[1]), "fingerprint": digest.hexdigest(), **meta}
    (root / INDEX).write_text(json.dumps(full, ensure_ascii=False, indent=2), encoding="utf-8")
    return root


class ImageLookup:
    """Item images from ``images.parquet`` without loading them all: an id -> (row group, row)
    map, and the last few row groups decoded in a small LRU cache."""

    def __init__(self, path: str | Path, cached_groups: int = 8) -> None:
        self._file = pq.ParquetFile(path)
        self._where: dict[str, tuple[int, int]] = {}
        for g in range(self._file.num_row_groups):
            ids = self._file.read_row_group(g, columns=["item_id"]).column(0).to_pylist()
            self._where.update({item_id: (g, i) for i, item_id in enumerate(ids)})
        self._cache: OrderedDict[int, list[bytes]] = OrderedDict()
        self._cached_groups = cached_groups
        self._lock = threading.Lock()  # the search page serves images from several threads

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._where

    def get(self, item_id: str) -> bytes | None:
        where = self._where.get(item_id)
        if where is None:
            return None
        group, row = where
        with self._lock:
            if group not in self._cache:
                self._cache[group] = self._file.read_row_group(group, columns=["image"]).column(0).to_pylist()
                if len(self._cache) > self._cached_groups:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(group)
            return self._cache[group][row]
