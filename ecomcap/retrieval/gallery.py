"""The gallery embedding artifact: the contract between training and the vector store / search.

A directory holding
- ``vectors.npy``     float32 [N, D], L2-normalised, row i = item i
- ``items.jsonl``     one ``{"item_id", "text"}`` per row, same order
- ``images.parquet``  (item_id, image bytes as stored: JPEG/PNG)
- ``encoder/``        the encoder that made the vectors (``load_encoder`` reads it)
- ``index.json``      {"count", "dim", "item_embedding", "fusion_weight", "encoder_dir", "fingerprint"}

Written streaming (memory-mapped vectors, row-group Parquet), so a 1M-item catalogue fits.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from ecomcap.data.shards import RowWriter, iter_batches, read_report
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.encoder import Encoder, load_encoder

IMAGES_SCHEMA = pa.schema([("item_id", pa.string()), ("image", pa.binary())])
INDEX = "index.json"


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

    @property
    def encoder_dir(self) -> Path:
        return (self.path / self.index["encoder_dir"]).resolve()

    def encoder(self, device: str | None = None) -> Encoder:
        return load_encoder(self.encoder_dir, device=device)

    def images(self, item_ids: list[str]) -> dict[str, bytes]:
        """Image bytes of the given items (a filtered Parquet read)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(self.path / "images.parquet", filters=pc.field("item_id").isin(item_ids))
        return dict(zip(table.column("item_id").to_pylist(), table.column("image").to_pylist()))


def embed_gallery(encoder_dir: str | Path, items_dir: str | Path, out_dir: str | Path,
                  batch_size: int = 128, mode: str | None = None, device: str | None = None) -> Path:
    """Embed every item of an ingested item dataset into a gallery artifact at `out_dir`."""
    encoder = load_encoder(encoder_dir, device=device)
    mode = mode or encoder.item_embedding
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
    row = 0
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as items, \
            tqdm(total=count, desc="embed gallery", unit="item", disable=None) as bar:
        for batch in iter_batches(items_dir, ["image_id", "image", "texts"], batch_size):
            ids = batch.column("image_id").to_pylist()
            blobs = batch.column("image").to_pylist()
            texts = [t[0] if t else "" for t in batch.column("texts").to_pylist()]
            pics = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
            vec = encoder.encode_items(pics, texts, mode=mode)
            vectors[row:row + len(ids)] = vec
            row += len(ids)
            for item_id, text, blob in zip(ids, texts, blobs):
                items.write(json.dumps({"item_id": item_id, "text": text}, ensure_ascii=False) + "\n")
                images.add({"item_id": item_id, "image": blob})
            digest.update(ids, texts, vec)
            bar.update(len(ids))
    if row != count:
        raise EcomcapError(f"{items_dir}: report says {count} items, shards hold {row}")
    vectors.flush()
    del vectors
    images.close()
    index = {"count": count, "dim": dim, "item_embedding": mode, "fusion_weight": encoder.fusion_weight,
             "encoder_dir": "encoder", "fingerprint": digest.hexdigest()}
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
    return Gallery(path, vectors, [r["item_id"] for r in rows], [r["text"] for r in rows], index)
