"""Synthesize (when asked) and ingest + validate every configured split: the data half of a run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecomcap.config import DataConfig, IngestConfig
from ecomcap.errors import EcomcapError


def source_dir(cfg: DataConfig) -> Path:
    """The raw MUGE directory: the synthetic set (generated once per settings) or `src_dir`."""
    if cfg.source == "dir":
        if cfg.src_dir is None:
            raise EcomcapError("data.source is 'dir' but data.src_dir is not set")
        return Path(cfg.src_dir)
    from ecomcap.data.synth import generate_synthetic

    raw = Path(cfg.work_dir) / "raw"
    wanted = cfg.synth.model_dump(mode="json")
    marker = raw / "synth.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("args") == wanted:
                return raw
        except (ValueError, AttributeError):
            pass
    generate_synthetic(raw, **wanted)
    return raw


def ingest_config(cfg: DataConfig) -> IngestConfig:
    """The ingest settings of this data: the synthetic set's brand list fills an empty
    `brand_balance.brands` (other data names its own)."""
    bal = cfg.ingest.brand_balance
    if cfg.source != "synthetic" or bal.brands or not bal.min_images:
        return cfg.ingest
    return cfg.ingest.model_copy(update={"brand_balance": bal.model_copy(update={"brands": brand_lexicon(cfg)})})


def brand_lexicon(cfg: DataConfig) -> list[str]:
    """The brands of this data: `ingest.brand_balance.brands`, else the synthetic set's own, else none
    (the filter, and brand accuracy while training, need a list)."""
    if cfg.ingest.brand_balance.brands or cfg.source != "synthetic":
        return list(cfg.ingest.brand_balance.brands)
    if cfg.synth.difficulty == "hard":
        from ecomcap.data.synth_hard import HARD_BRANDS as brands
    else:
        from ecomcap.data.synth_draw import BRANDS as brands
    return list(brands)


def prepare_data(cfg: DataConfig) -> dict[str, dict[str, Any]]:
    """Ingest + validate each split into ``work_dir/<split>``; returns the reports by split.

    Raises EcomcapError for the first split that fails its gate, after all are written.
    """
    from ecomcap.data.ingest import ingest_split
    from ecomcap.data.validate import enforce, validate_dataset

    src = source_dir(cfg)
    reports = {}
    for split in cfg.splits:
        result = ingest_split(src, split, Path(cfg.work_dir) / split, ingest_config(cfg))
        reports[split] = validate_dataset(result.out_dir, cfg.ingest)
    for report in reports.values():
        enforce(report)
    return reports
