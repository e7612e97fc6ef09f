"""A dataset cut into chunks, and the finished chunks ("parts") of a batch-inference run.

A chunk is a row range of one shard (reads stay sequential; no chunk spans two files). Each
finished chunk is one `caption_gen` part, written to a temporary name and renamed into place,
so a part either exists whole or not at all: a killed run leaves no half part, and a rerun
skips every chunk whose part exists. Parts live under a key of everything that decides the
captions (dataset fingerprint, model content, prompt, decoding, chunk size), so a rerun with
another model or config never picks up stale parts, while the same model loaded from another
path (each Kubernetes pod copies it into its own temporary directory) finds them. The merge checks that every id comes exactly once.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ecomcap.data.formats import write_predictions
from ecomcap.data.shards import read_report, shard_paths
from ecomcap.errors import EcomcapError
from ecomcap.training.identity import model_fingerprint


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of shard file `shard`; `index` orders chunks across the dataset."""

    index: int
    shard: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}.jsonl"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_chunks(dataset_dir: str | Path, chunk_size: int) -> list[Chunk]:
    """Chunks of at most `chunk_size` rows, shard by shard, from Parquet metadata only."""
    chunks: list[Chunk] = []
    for path in shard_paths(dataset_dir):
        n = pq.ParquetFile(path).metadata.num_rows
        for start in range(0, n, chunk_size):
            chunks.append(Chunk(len(chunks), path.name, start, min(start + chunk_size, n)))
    return chunks


def read_chunk(dataset_dir: str | Path, chunk: Chunk, columns: list[str]) -> pa.Table:
    """The chunk's rows, reading only the row groups that overlap it."""
    pf = pq.ParquetFile(Path(dataset_dir) / "shards" / chunk.shard)
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > chunk.start and offset < chunk.stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(chunk.start - first, len(chunk))


def model_identity(model: str | Path) -> dict:
    """What `load_trained` loads, by content, not path: the directory's fingerprint (configs,
    weight sizes, head/tail bytes) and, for an adapter, its base's identity (a hub id as it is)."""
    from ecomcap.modeling.load import read_output_marker

    ident: dict = {"fingerprint": model_fingerprint(model)}
    info = read_output_marker(model) if Path(model).is_dir() else None
    if info and info.get("kind") == "adapter" and info.get("base"):
        ident["base"] = model_identity(info["base"])
        ident["quantized_base"] = info.get("quantized_base", info.get("strategy") == "qlora")
    return ident


def run_key(dataset_dir: str | Path, model: str, prompt: str, decoding: dict, chunk_size: int) -> str:
    """Identity of a batch-inference run: parts of the same key are interchangeable."""
    blob = json.dumps({"data": read_report(dataset_dir)["fingerprint"], "model": model_identity(model),
                       "prompt": prompt,
                       "decoding": decoding, "chunk_size": chunk_size}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PartStore:
    """Finished chunks of one run, in one directory (`<parts root>/<run key>`)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, chunk: Chunk) -> bool:
        return (self.dir / chunk.name).is_file()

    def write(self, chunk: Chunk, rows: Iterable[tuple[str, str]]) -> None:
        """Atomically: a temporary file in the same directory, then rename."""
        fd, tmp = tempfile.mkstemp(prefix=f".{chunk.name}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            n = write_predictions(tmp, rows)
            if n != len(chunk):
                raise EcomcapError(f"chunk {chunk.index}: {n} captions for {len(chunk)} images")
            os.replace(tmp, self.dir / chunk.name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, chunk: Chunk) -> list[tuple[str, str]]:
        with open(self.dir / chunk.name, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        return [(r["image_id"], r["text"]) for r in rows]

    def merge(self, chunks: list[Chunk], out_path: str | Path, extra: Iterable[str] = ()) -> dict[str, str]:
        """All parts in chunk order (then `extra` ids with empty captions) -> `caption_gen.jsonl`.

        Refuses when a part is missing or an id appears twice: every id exactly once.
        """
        missing = [c.index for c in chunks if not self.done(c)]
        if missing:
            raise EcomcapError(f"{len(missing)} of {len(chunks)} chunks have no part yet (first: {missing[:5]}); "
                               "rerun to finish them")
        preds: dict[str, str] = {}
        for c in chunks:
            rows = self.read(c)
            if len(rows) != len(c):
                raise EcomcapError(f"{self.dir / c.name}: {len(rows)} rows for a chunk of {len(c)}")
            for image_id, text in rows:
                if image_id in preds:
                    raise EcomcapError(f"image id {image_id!r} captioned twice (chunk {c.index})")
                preds[image_id] = text
        for image_id in extra:
            preds.setdefault(image_id, "")
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        write_predictions(tmp, preds.items())
        os.replace(tmp, out)
        return preds
