"""Synthesize (when configured) and ingest every retrieval split: the data half of a run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecomcap.data.fingerprint import source_fingerprint
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.config import RetrievalDataConfig


def retrieval_source(cfg: RetrievalDataConfig) -> tuple[Path, str]:
    """(raw directory, format): the synthetic set, generated once per settings, or `src_dir`."""
    if cfg.source != "synthetic":
        if cfg.src_dir is None:
            raise EcomcapError(f"data.source is '{cfg.source}' but data.src_dir is not set")
        return Path(cfg.src_dir), cfg.source
    from ecomcap.retrieval.data.synth import generate_retrieval_synthetic

    raw = Path(cfg.work_dir) / "raw"
    marker = raw / "synth.json"
    wanted = cfg.synth.model_dump(mode="json")
    if not (marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("config") == wanted):
        generate_retrieval_synthetic(raw, cfg.synth, tuple(s for s in cfg.splits if s != "test"))
    return raw, "muge"


def ingest_retrieval(cfg: RetrievalDataConfig, split: str, out: Path) -> dict[str, Any]:
    from ecomcap.retrieval.data.ingest import ingest_retrieval_split

    src, fmt = retrieval_source(cfg)
    return ingest_retrieval_split(src, split, out, fmt, cfg.ingest)


def enforce_retrieval(report: dict[str, Any]) -> None:
    """One-line EcomcapError when a split must not be used (the captioning gate, per table)."""
    from ecomcap.data.validate import enforce

    enforce({**report["items"], "split": f"{report['split']} items"})
    if "queries" in report:
        enforce({**report["queries"], "split": f"{report['split']} queries",
                 "max_bad_rate": report["items"]["max_bad_rate"]})


def prepare_retrieval_data(cfg: RetrievalDataConfig) -> dict[str, Path]:
    """Ingest each configured split into ``work_dir/<split>`` and enforce the bad-row gate."""
    dirs = {}
    for split in cfg.splits:
        out = Path(cfg.work_dir) / split
        enforce_retrieval(ingest_retrieval(cfg, split, out))
        dirs[split] = out
    return dirs


# the captioning job's function, not a second one (kept under this name for steps/retrieval.py)
retrieval_source_fingerprint = source_fingerprint
