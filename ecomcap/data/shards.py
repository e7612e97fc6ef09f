"""The Parquet shard dataset: a directory of ``shards/part-*.parquet`` plus ``report.json``.

Written in bounded row groups so memory stays flat however many rows stream through; read
back by columns so metadata-only passes (validation, fingerprints) never touch image bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ecomcap.errors import EcomcapError

DATASET_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("texts", pa.list_(pa.string())),
        ("n_texts", pa.int32()),
        ("max_text_tokens", pa.int32()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line_no", pa.int64()),
        ("image_id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
META_COLUMNS = ["image_id", "format", "width", "height", "sha256", "n_texts", "max_text_tokens"]


class RowWriter:
    """Buffer rows and write them as Parquet row groups, rolling to a new file every N rows."""

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        rows_per_group: int,
        rows_per_file: int | None = None,
        single_name: str | None = None,
    ) -> None:
        self.directory, self.schema = Path(directory), schema
        self.rows_per_group, self.rows_per_file = rows_per_group, rows_per_file
        self.single_name = single_name
        self.files: list[str] = []
        self.rows = 0
        self._buf: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        self._buf.append(row)
        self.rows += 1
        if len(self._buf) >= self.rows_per_group:
            self._flush()

    def _open(self) -> pq.ParquetWriter:
        name = self.single_name or f"part-{len(self.files):05d}.parquet"
        self.files.append(name)
        self._in_file = 0
        return pq.ParquetWriter(self.directory / name, self.schema, compression="zstd")

    def _flush(self) -> None:
        while self._buf:
            if self._writer is None:
                self._writer = self._open()
            room = len(self._buf)
            if self.rows_per_file:
                room = min(room, self.rows_per_file - self._in_file)
            chunk, self._buf = self._buf[:room], self._buf[room:]
            self._writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema))
            self._in_file += len(chunk)
            if self.rows_per_file and self._in_file >= self.rows_per_file:
                self._writer.close()
                self._writer = None

    def close(self) -> list[str]:
        """Flush and close; an empty writer still leaves one valid (empty) file."""
        self._flush()
        if self._writer is None and not self.files:
            self._writer = self._open()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files


def read_report(dataset_dir: str | Path) -> dict[str, Any]:
    """The ingest report (also the dataset manifest) of a shard dataset directory."""
    path = Path(dataset_dir) / "report.json"
    if not path.is_file():
        raise EcomcapError(f"{dataset_dir} is not an ingested dataset (no report.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def shard_paths(dataset_dir: str | Path) -> list[Path]:
    """Shard files in order, as listed by the report."""
    report = read_report(dataset_dir)
    return [Path(dataset_dir) / "shards" / name for name in report["shards"]]


def read_table(dataset_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of the selected columns (pick columns: image bytes are large)."""
    tables = [pq.read_table(p, columns=columns) for p in shard_paths(dataset_dir)]
    if not tables:
        schema = DATASET_SCHEMA if columns is None else pa.schema(
            [DATASET_SCHEMA.field(c) for c in columns]
        )
        return schema.empty_table()
    return pa.concat_tables(tables)


def iter_batches(
    dataset_dir: str | Path, columns: list[str] | None = None, batch_size: int = 256
) -> Iterator[pa.RecordBatch]:
    """Stream record batches across shards without loading a whole shard."""
    for path in shard_paths(dataset_dir):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def read_references(dataset_dir: str | Path) -> dict[str, list[str]]:
    """image_id -> cleaned references (text only; used for evaluation and the SCST df table)."""
    table = read_table(dataset_dir, ["image_id", "texts"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("texts").to_pylist()))
