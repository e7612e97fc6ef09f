"""Streaming ingest of one split: raw MUGE/ad files -> Parquet shards + quarantine + report.

Every input record ends up in exactly one place: a shard row or a quarantine row with a
reason, so ``rows_in == rows_ok + rows_quarantined`` always. Captions are joined to images
through an on-disk SQLite index, so memory stays flat in the number of rows.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ecomcap.config import IngestConfig
from ecomcap.data.brand_balance import BrandBalance
from ecomcap.data.clean import clean_references
from ecomcap.data.formats import (
    SourceLayout,
    caption_record,
    decode_base64,
    detect_layout,
    iter_lines,
    parse_json_line,
)
from ecomcap.data.images import check_image
from ecomcap.data.shards import DATASET_SCHEMA, QUARANTINE_SCHEMA, RowWriter
from ecomcap.errors import EcomcapError
from ecomcap.text import printable, tokenize

SPLITS = ("train", "valid", "test")


@dataclass
class IngestResult:
    """Where the dataset went and its report (also written to ``report.json``)."""

    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


class _CaptionIndex:
    """image_id -> references on disk (SQLite), marking which ids found their image."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE refs (image_id TEXT PRIMARY KEY, texts TEXT, line_no INT, used INT);"
            "CREATE TABLE seen (image_id TEXT PRIMARY KEY);"
        )

    def add(self, image_id: str, texts: list[str] | None, line_no: int) -> bool:
        """False when the id is already indexed (duplicate caption record)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO refs VALUES (?, ?, ?, 0)",
            (image_id, json.dumps(texts), line_no),  # ASCII escapes: lone surrogates survive
        )
        return cur.rowcount == 1

    def first_sighting(self, image_id: str) -> bool:
        """True the first time an image id is seen in the image file."""
        return self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (image_id,)).rowcount == 1

    def take(self, image_id: str) -> tuple[bool, list[str] | None]:
        """(has a caption record, its texts) and mark it joined."""
        row = self.db.execute("SELECT texts FROM refs WHERE image_id = ?", (image_id,)).fetchone()
        if row is None:
            return False, None
        self.db.execute("UPDATE refs SET used = 1 WHERE image_id = ?", (image_id,))
        return True, json.loads(row[0])

    def all_texts(self):
        return (json.loads(row[0]) for row in self.db.execute("SELECT texts FROM refs"))

    def orphans(self):
        return self.db.execute("SELECT image_id, line_no FROM refs WHERE used = 0 ORDER BY line_no")

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)


class _Ingester:
    """Holds the writers and counters of one ingest run.

    Captioning needs texts on every train/valid image; retrieval items (``needs_text=False``,
    ``id_key="item_id"``) keep their optional texts when present. Readers other than the
    image TSV (a CSV plus an image folder) feed rows through `add_row`.
    """

    def __init__(self, out_dir: Path, split: str, layout: SourceLayout, cfg: IngestConfig,
                 needs_text: bool | None = None, id_key: str = "image_id"):
        self.out_dir, self.split, self.layout, self.cfg = out_dir, split, layout, cfg
        self.needs_text = split != "test" if needs_text is None else needs_text
        self.id_key = id_key
        self.shards = RowWriter(out_dir / "shards", DATASET_SCHEMA, cfg.rows_per_group, cfg.rows_per_shard)
        self.quarantine = RowWriter(out_dir, QUARANTINE_SCHEMA, cfg.rows_per_group, single_name="quarantine.parquet")
        self.reasons: Counter = Counter()
        self.rules: Counter = Counter()
        self.refs_in = self.refs_kept = self.rows_in = 0
        self.fingerprint = hashlib.sha256()
        self.index = _CaptionIndex(out_dir / ".captions.sqlite")
        self.balance = BrandBalance(cfg.brand_balance, split if needs_text is None else "")

    def reject(self, source: str, line_no: int, image_id: str, reason: str, detail: str = "") -> None:
        self.reasons[reason] += 1
        self.quarantine.add({"source": source, "line_no": line_no, "image_id": printable(image_id, 500),
                             "reason": reason, "detail": printable(detail, 500)})

    def index_captions(self, path: Path) -> None:
        """Stream the captions JSONL into the on-disk index; bad lines are quarantined now."""
        for line in iter_lines(path):
            try:
                image_id, texts = caption_record(parse_json_line(line), self.needs_text, self.id_key)
            except ValueError as exc:
                self.rows_in += 1
                self.reject(path.name, line.line_no, "", "bad_json", str(exc))
                continue
            if not self.index.add(image_id, texts, line.line_no):
                self.rows_in += 1
                self.reject(path.name, line.line_no, image_id, "duplicate_caption_id", "kept the first record")

    def ingest_images(self, path: Path) -> None:
        ncols = 3 if self.layout.kind == "ad" else 2
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"ingest {self.split}", disable=None) as bar:
            for line in iter_lines(path):
                bar.update(len(line.text) + 1)
                self.rows_in += 1
                self._one_row(path.name, line.line_no, line.text.split("\t"), ncols)

    def _one_row(self, source: str, line_no: int, cols: list[str], ncols: int) -> None:
        image_id = cols[0].strip()
        if len(cols) != ncols or not image_id:
            self.reject(source, line_no, image_id, "malformed_line", f"{len(cols)} columns, expected {ncols}")
            return
        self.add_row(source, line_no, image_id, lambda: decode_base64(cols[1]), [cols[2]] if ncols == 3 else None)

    def add_row(self, source: str, line_no: int, image_id: str, load: Callable[[], bytes],
                inline_texts: list[str] | None = None, load_error: str = "bad_base64") -> bool:
        """Check and store one image row from any reader; True when it went to the shards.

        `load` returns the image bytes or raises ValueError (quarantined as `load_error`);
        texts come inline or from the caption index.
        """
        if not self.index.first_sighting(image_id):
            self.reject(source, line_no, image_id, "duplicate_id", "kept the first occurrence")
            return False
        if inline_texts is not None:
            has_record, texts = True, inline_texts
        else:
            has_record, texts = self.index.take(image_id)
        try:
            data = load()
        except ValueError as exc:
            self.reject(source, line_no, image_id, load_error, str(exc))
            return False
        check = check_image(data, min_side=self.cfg.min_side, max_pixels=self.cfg.max_pixels,
                            max_aspect_ratio=self.cfg.max_aspect_ratio)
        if not check.ok:
            self.reject(source, line_no, image_id, check.reason or "bad_image", check.detail)
            return False
        kept: list[str] = []
        if self.needs_text:
            if not has_record or not texts:
                self.reject(source, line_no, image_id, "no_captions", "no caption record for this image")
                return False
            self.refs_in += len(texts)
            cleaned = clean_references(texts, self.cfg.clean, self.rules)
            if cleaned.reason:
                self.reject(source, line_no, image_id, cleaned.reason, f"all {len(texts)} references dropped")
                return False
            kept = cleaned.kept
            brand = self.balance.rare(kept)
            if brand is not None:
                self.reject(source, line_no, image_id, "rare_brand",
                            f"{brand}: {self.balance.counts[brand]} images < brand_balance.min_images")
                return False
            self.refs_kept += len(kept)
        elif texts:  # optional texts (retrieval item titles/captions): kept when they survive cleaning
            self.refs_in += len(texts)
            kept = clean_references(texts, self.cfg.clean, self.rules).kept
            self.refs_kept += len(kept)
        digest = hashlib.sha256(data).hexdigest()
        self.fingerprint.update(f"{image_id}\t{digest}\t{json.dumps(kept, ensure_ascii=False)}\n".encode())
        self.shards.add(
            {
                "image_id": image_id, "image": data, "format": check.format,
                "width": check.width, "height": check.height, "sha256": digest,
                "texts": kept, "n_texts": len(kept),
                "max_text_tokens": max((len(tokenize(t)) for t in kept), default=0),
            }
        )
        return True

    def quarantine_orphans(self, source: str) -> None:
        reason = "captions_without_image" if self.needs_text else "id_without_image"
        for image_id, line_no in self.index.orphans():
            self.rows_in += 1
            self.reject(source, line_no, image_id, reason, "caption record has no image line")

    def finish(self, started: float) -> dict[str, Any]:
        shard_files = self.shards.close()
        self.quarantine.close()
        self.index.close()
        rows_q = sum(self.reasons.values())
        # images the brand filter took out are a choice, not a defect: not in the bad rate
        filtered = self.reasons.get("rare_brand", 0)
        rate = (rows_q - filtered) / self.rows_in if self.rows_in else 0.0
        elapsed = time.perf_counter() - started
        return {
            "split": self.split,
            "format": self.layout.kind,
            "needs_text": self.needs_text,
            "source": {"images": printable(str(self.layout.images), 4096),
                       "captions": printable(str(self.layout.captions or ""), 4096)},
            "rows_in": self.rows_in,
            "rows_ok": self.shards.rows,
            "rows_quarantined": rows_q,
            "rows_filtered": filtered,
            "reasons": dict(self.reasons.most_common()),
            "bad_rate": round(rate, 6),
            "max_bad_rate": self.cfg.max_bad_rate,
            "passed": rate <= self.cfg.max_bad_rate and self.shards.rows > 0,
            "refs_in": self.refs_in,
            "refs_kept": self.refs_kept,
            "caption_rules": dict(sorted(self.rules.items())),
            "shards": shard_files,
            "fingerprint": self.fingerprint.hexdigest(),
            "elapsed_s": round(elapsed, 3),
            "rows_per_s": round(self.rows_in / elapsed, 1) if elapsed > 0 else None,
            "config": self.cfg.model_dump(mode="json"),
            **({"brand_balance": b} if (b := self.balance.report()) else {}),
        }


def ingest_split(src: str | Path, split: str, out_dir: str | Path, cfg: IngestConfig | None = None) -> IngestResult:
    """Ingest one split of `src` into `out_dir`; raises EcomcapError when the source is unusable.

    The bad-row limit is not enforced here (see `ecomcap.data.validate.enforce`), so a failing
    run still leaves its quarantine table and report to look at.
    """
    cfg = cfg or IngestConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    layout = detect_layout(src, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "shards").glob("part-*.parquet"):
        old.unlink()
    started = time.perf_counter()
    run = _Ingester(out, split, layout, cfg)
    if layout.captions is not None:
        run.index_captions(layout.captions)
        run.balance.count(run.index.all_texts())
    elif run.balance.active:
        raise EcomcapError("ingest.brand_balance needs a separate captions file (MUGE IC format) to count brands "
                           "before the images stream")
    run.ingest_images(layout.images)
    if layout.captions is not None:
        run.quarantine_orphans(layout.captions.name)
    return finish_ingest(run, started)


def finish_ingest(run: _Ingester, started: float) -> IngestResult:
    """Close the writers, check the counts are conserved, write ``report.json``."""
    report = run.finish(started)
    assert report["rows_in"] == report["rows_ok"] + report["rows_quarantined"]
    (run.out_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return IngestResult(run.out_dir, report)


Ingester = _Ingester  # the row checker / writer other jobs' readers drive (retrieval items)
