"""Retrieval data ingest: items (images + optional texts) and queries, with quarantine.

Items go through the captioning ingester (`ecomcap.data.ingest.Ingester`: same image checks,
duplicate ids, Parquet shards, quarantine table, report) with optional texts; queries are then
checked against the items that survived. A split directory holds

- ``items/``              a shard dataset (``image_id`` = item id, ``texts`` = item texts)
- ``queries.parquet``     query_id, query_text, item_ids (only items that exist)
- ``queries_quarantine.parquet`` one row per dropped query or dropped query->item link
- ``groups.parquet``      item_id, group (product groups, when the source has them)
- ``report.json``         counts for both tables: rows_in == rows_ok + rows_quarantined

Sources: MUGE MR (``MR_{split}_queries.jsonl``, ``MR_{split}_imgs.tsv``, optional
``MR_{split}_item_texts.jsonl`` / ``MR_{split}_groups.jsonl``), seed 002's variant (train rows
``{query_id, query_text, image_id, text_input}``, valid rows with ``item_ids`` as {id: text})
and a Shopee-style CSV (posting_id, image, title, label_group) with an image folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ecomcap.config import IngestConfig
from ecomcap.data.formats import SourceLayout, iter_lines, parse_json_line
from ecomcap.data.ingest import Ingester, finish_ingest
from ecomcap.data.shards import RowWriter, read_table
from ecomcap.errors import EcomcapError

QUERY_SCHEMA = pa.schema([("query_id", pa.string()), ("query_text", pa.string()),
                          ("item_ids", pa.list_(pa.string()))])
QUERY_QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("line_no", pa.int64()), ("query_id", pa.string()),
                                     ("item_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
GROUP_SCHEMA = pa.schema([("item_id", pa.string()), ("group", pa.string())])
FORMATS = ("muge", "seed002", "shopee")


def _find(src: Path, patterns: list[str], what: str, required: bool = True) -> Path | None:
    for pattern in patterns:
        hits = sorted(src.glob(pattern))
        if hits:
            return hits[0]
    if required:
        raise EcomcapError(f"no {what} in {src}: expected one of {', '.join(patterns)}")
    return None


class _Queries:
    """Query records in arrival order, merged by id (seed 002 repeats a query per image)."""

    def __init__(self, source: str):
        self.source = source
        self.rows: dict[str, dict[str, Any]] = {}
        self.reasons: Counter = Counter()
        self.rows_in = self.refs_in = 0
        self.rejected: list[dict[str, Any]] = []

    def reject(self, line_no: int, query_id: str, reason: str, detail: str = "", item_id: str = "") -> None:
        self.reasons[reason] += 1
        self.rejected.append({"source": self.source, "line_no": line_no, "query_id": query_id,
                              "item_id": item_id, "reason": reason, "detail": detail})

    def add(self, line_no: int, obj: dict[str, Any], merge: bool, need_items: bool) -> dict[str, list[str]]:
        """Take one record; returns the item texts it carries ({} when none)."""
        self.rows_in += 1
        qid, text = str(obj.get("query_id", "")).strip(), obj.get("query_text")
        if not qid or not isinstance(text, str) or not text.strip():
            self.reject(line_no, qid, "malformed_query", "needs query_id and a non-empty query_text")
            return {}
        items, texts = _record_items(obj)
        if items is None and need_items:
            self.reject(line_no, qid, "malformed_query", "no item_ids / image_id")
            return {}
        self.refs_in += len(items or [])
        old = self.rows.get(qid)
        if old is not None and not (merge and old["query_text"] == text.strip()):
            self.refs_in -= len(items or [])
            self.reject(line_no, qid, "duplicate_query_id", "kept the first record")
            return texts
        if old is None:
            self.rows[qid] = {"query_id": qid, "query_text": text.strip(), "item_ids": [], "line_no": line_no}
        else:
            self.rows_in -= 1  # a merged seed-002 pair row, not a new query
        self.rows[qid]["item_ids"].extend(items or [])
        return texts


def _record_items(obj: dict[str, Any]) -> tuple[list[str] | None, dict[str, list[str]]]:
    """(item ids, item texts) of a MUGE row, a seed-002 train row (image_id + text_input) or a
    seed-002 valid row (item_ids as {id: text})."""
    ids = obj.get("item_ids")
    if isinstance(ids, dict):
        return [str(k) for k in ids], {str(k): [v] for k, v in ids.items() if isinstance(v, str)}
    if isinstance(ids, list):
        return [str(i) for i in ids], {}
    if "image_id" in obj:
        texts = obj.get("text_input") or []
        texts = [texts] if isinstance(texts, str) else [t for t in texts if isinstance(t, str)]
        return [str(obj["image_id"])], ({str(obj["image_id"]): texts} if texts else {})
    return None, {}


def _iter_query_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line_no, record or None, error) from JSONL, or from a JSON array file (seed 002's .json)."""
    first = next(iter_lines(path), None)
    if first is not None and first.text.lstrip().startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError as exc:
            raise EcomcapError(f"{path} is not valid JSON: {exc}") from None
        for i, obj in enumerate(data, start=1):
            yield (i, obj, "") if isinstance(obj, dict) else (i, None, "array element is not an object")
        return
    for line in iter_lines(path):
        try:
            yield line.line_no, parse_json_line(line), ""
        except ValueError as exc:
            yield line.line_no, None, str(exc)


def ingest_retrieval_split(src: str | Path, split: str, out_dir: str | Path, fmt: str = "muge",
                           cfg: IngestConfig | None = None, with_queries: bool = True) -> dict[str, Any]:
    """Ingest one split (items, then queries against the surviving items); returns the report.
    `with_queries=False`: items only (a catalogue to index: MR_{split}_imgs.tsv + optional texts)."""
    cfg = cfg or IngestConfig()
    if fmt not in FORMATS:
        raise EcomcapError(f"retrieval source format must be one of {FORMATS}, not '{fmt}'")
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise EcomcapError(f"retrieval source {src} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "items" / "shards").glob("part-*.parquet"):
        old.unlink()
    started = time.perf_counter()
    groups: dict[str, str] = {}
    queries = None
    if fmt == "shopee":
        items = _shopee_items(src, split, out / "items", cfg, groups, started)
    else:
        images = _find(src, [f"MR_{split}_imgs.tsv", f"{split}_imgs.tsv"], f"{split} image file")
        qfile = _find(src, [f"MR_{split}_queries.jsonl", f"MR_{split}_queries*.json*"], f"{split} queries file") \
            if with_queries else None
        texts_file = _find(src, [f"MR_{split}_item_texts.jsonl", f"{split}_item_texts.jsonl"], "", required=False)
        run = Ingester(out / "items", split, SourceLayout(fmt, images, texts_file), cfg, needs_text=False,
                       id_key="item_id")
        if texts_file is not None:
            run.index_captions(texts_file)
        queries = _Queries(qfile.name) if qfile is not None else None
        for line_no, obj, error in _iter_query_records(qfile) if qfile is not None else ():
            if obj is None:
                queries.rows_in += 1
                queries.reject(line_no, "", "bad_json", error)
                continue
            for item_id, texts in queries.add(line_no, obj, merge=fmt == "seed002", need_items=split != "test").items():
                run.index.add(item_id, texts, line_no)  # an item in several queries: first texts kept
        run.ingest_images(images)
        if texts_file is not None or fmt == "seed002":
            run.quarantine_orphans((texts_file or qfile).name)
        items = finish_ingest(run, started).report
        group_file = _find(src, [f"MR_{split}_groups.jsonl"], "", required=False)
        if group_file is not None:
            groups = _read_group_file(group_file)
    ok_ids = set(read_table(out / "items", ["image_id"]).column("image_id").to_pylist())
    report = {"split": split, "format": fmt, "items": _summary(items), "passed": bool(items["passed"])}
    if queries is not None:
        report["queries"] = _write_queries(queries, ok_ids, out, cfg, need_items=split != "test")
        report["passed"] = report["passed"] and report["queries"]["passed"]
    _write_groups({k: v for k, v in groups.items() if k in ok_ids}, out / "groups.parquet")
    report["groups"] = len(set(groups[k] for k in groups if k in ok_ids))
    report["fingerprint"] = hashlib.sha256(json.dumps(
        [items["fingerprint"], report.get("queries", {}).get("fingerprint", ""), report["groups"]]).encode()
    ).hexdigest()
    report["elapsed_s"] = round(time.perf_counter() - started, 3)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return report


def _summary(items: dict[str, Any]) -> dict[str, Any]:
    keys = ("rows_in", "rows_ok", "rows_quarantined", "reasons", "bad_rate", "max_bad_rate", "passed",
            "refs_in", "refs_kept", "fingerprint")
    return {k: items[k] for k in keys}


def _write_queries(q: _Queries, ok_ids: set[str], out: Path, cfg: IngestConfig, need_items: bool) -> dict[str, Any]:
    """Drop links to items that did not survive; quarantine queries left with none."""
    writer = RowWriter(out, QUERY_SCHEMA, cfg.rows_per_group, single_name="queries.parquet")
    digest = hashlib.sha256()
    refs_kept = 0
    for row in q.rows.values():
        kept = list(dict.fromkeys(i for i in row["item_ids"] if i in ok_ids))
        for item_id in row["item_ids"]:
            if item_id not in ok_ids:
                q.reject(row["line_no"], row["query_id"], "orphan_item_id", "item missing or quarantined", item_id)
        duplicates = len(row["item_ids"]) - len(set(row["item_ids"]))
        if duplicates:
            q.reasons["duplicate_item_link"] += duplicates  # counted links, not rows: kept once
        if need_items and not kept:
            q.reject(row["line_no"], row["query_id"], "query_without_valid_item",
                     f"all {len(row['item_ids'])} items missing or quarantined")
            continue
        refs_kept += len(kept)
        writer.add({"query_id": row["query_id"], "query_text": row["query_text"], "item_ids": kept})
        digest.update(json.dumps([row["query_id"], row["query_text"], kept], ensure_ascii=False).encode())
    writer.close()
    bad = RowWriter(out, QUERY_QUARANTINE_SCHEMA, cfg.rows_per_group, single_name="queries_quarantine.parquet")
    for r in q.rejected:
        bad.add(r)
    bad.close()
    dropped_rows = sum(v for k, v in q.reasons.items() if k in ("malformed_query", "bad_json", "duplicate_query_id",
                                                                  "query_without_valid_item"))
    assert q.rows_in == writer.rows + dropped_rows
    refs_dropped = q.reasons["orphan_item_id"] + q.reasons["duplicate_item_link"]
    assert q.refs_in == refs_kept + refs_dropped
    rate = dropped_rows / q.rows_in if q.rows_in else 0.0
    return {"rows_in": q.rows_in, "rows_ok": writer.rows, "rows_quarantined": dropped_rows,
            "refs_in": q.refs_in, "refs_kept": refs_kept, "refs_dropped": refs_dropped,
            "reasons": dict(q.reasons.most_common()), "bad_rate": round(rate, 6),
            "passed": rate <= cfg.max_bad_rate and writer.rows > 0, "fingerprint": digest.hexdigest()}


def _shopee_items(src: Path, split: str, out: Path, cfg: IngestConfig, groups: dict[str, str],
                  started: float) -> dict[str, Any]:
    """Shopee CSV rows (posting_id, image, title, label_group) with images from a folder."""
    table = _find(src, [f"{split}.csv"], f"{split}.csv")
    folder = next((p for p in (src / f"{split}_images", src / "images") if p.is_dir()), None)
    if folder is None:
        raise EcomcapError(f"no image folder for {table.name}: expected {split}_images/ or images/")
    run = Ingester(out, split, SourceLayout("shopee", table, None), cfg, needs_text=False, id_key="posting_id")

    def loader(name: str):
        def load() -> bytes:
            path = folder / name
            if not name or not path.is_file():
                raise ValueError(f"{name!r} not in {folder.name}/")
            return path.read_bytes()
        return load

    with open(table, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"posting_id", "image", "title"} - set(reader.fieldnames or [])
        if missing:
            raise EcomcapError(f"{table}: missing columns {sorted(missing)}")
        for line_no, row in enumerate(reader, start=2):
            run.rows_in += 1
            pid = (row.get("posting_id") or "").strip()
            if not pid:
                run.reject(table.name, line_no, "", "malformed_line", "no posting_id")
                continue
            title = (row.get("title") or "").strip()
            if run.add_row(table.name, line_no, pid, loader((row.get("image") or "").strip()),
                           [title] if title else [], load_error="missing_image_file") and row.get("label_group"):
                groups[pid] = str(row["label_group"]).strip()
    return finish_ingest(run, started).report


def _read_group_file(path: Path) -> dict[str, str]:
    """{"item_id", "group"} lines; a malformed line is a clear error (groups are metadata we
    evaluate matching with: a silently partial table would change the metric)."""
    out = {}
    for line in iter_lines(path):
        try:
            obj = parse_json_line(line)
            out[str(obj["item_id"])] = str(obj["group"])
        except (ValueError, KeyError) as exc:
            raise EcomcapError(f"{path.name} line {line.line_no}: expected {{\"item_id\", \"group\"}} ({exc})") from None
    return out


def _write_groups(groups: dict[str, str], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"item_id": k, "group": v} for k, v in groups.items()], schema=GROUP_SCHEMA),
                   path)


def read_queries(split_dir: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(Path(split_dir) / "queries.parquet").to_pylist()


def read_groups(split_dir: str | Path) -> dict[str, str]:
    t = pq.read_table(Path(split_dir) / "groups.parquet")
    return dict(zip(t.column("item_id").to_pylist(), t.column("group").to_pylist()))
