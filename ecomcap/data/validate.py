"""Data validation over an ingested split: a Great Expectations 1.x suite plus the bad-row gate.

GX runs in an ephemeral context over the metadata columns only (never the image bytes), so it
scales with the row count, not the image sizes. ZenML's GX integration pins GX < 1.0, so GX
is called directly here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ecomcap.config import IngestConfig
from ecomcap.data.shards import META_COLUMNS, read_report, read_table
from ecomcap.errors import EcomcapError


def _quiet_import_gx():
    """Import GX with its import-time INFO chatter ("Skipping registering function ...") muted."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def _expectations(cfg: IngestConfig, needs_text: bool) -> list[Any]:
    gx = _quiet_import_gx()

    e = gx.expectations
    max_side = int(cfg.max_pixels // cfg.min_side)
    exps: list[Any] = [
        e.ExpectTableRowCountToBeBetween(min_value=1),
        e.ExpectColumnValuesToNotBeNull(column="image_id"),
        e.ExpectColumnValuesToBeUnique(column="image_id"),
        e.ExpectColumnValuesToNotBeNull(column="sha256"),
        e.ExpectColumnValueLengthsToEqual(column="sha256", value=64),
        e.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side, max_value=max_side),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side, max_value=max_side),
        e.ExpectColumnValuesToBeInSet(column="format", value_set=["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]),
    ]
    if needs_text:
        exps += [
            e.ExpectColumnValuesToBeBetween(column="n_texts", min_value=1),
            e.ExpectColumnValuesToBeBetween(
                column="max_text_tokens", min_value=1, max_value=cfg.clean.max_caption_tokens
            ),
        ]
    return exps


def run_expectations(dataset_dir: str | Path, cfg: IngestConfig) -> dict[str, Any]:
    """Run the suite over the clean table; returns {success, failed: [...], result: GX json}."""
    gx = _quiet_import_gx()
    report = read_report(dataset_dir)
    df = read_table(dataset_dir, META_COLUMNS).to_pandas()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("ingested").add_dataframe_asset(report["split"])
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": df}
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"ecomcap_{report['split']}"))
    for exp in _expectations(cfg, report.get("needs_text", report["split"] != "test")):
        suite.add_expectation(exp)
    result = batch.validate(suite)
    as_json = result.describe_dict() if hasattr(result, "describe_dict") else result.to_json_dict()
    failed = [
        {
            "expectation": r.expectation_config.type,
            "column": r.expectation_config.kwargs.get("column"),
            "unexpected_count": (r.result or {}).get("unexpected_count"),
            "partial_unexpected_list": (r.result or {}).get("partial_unexpected_list", [])[:5],
        }
        for r in result.results
        if not r.success
    ]
    return {"success": bool(result.success), "evaluated": len(result.results), "failed": failed, "result": as_json}


def validate_dataset(dataset_dir: str | Path, cfg: IngestConfig, write: bool = True) -> dict[str, Any]:
    """Run GX and fold the verdict into the report; with `write`, save ``gx_result.json`` and
    the updated ``report.json`` next to the data (a pipeline keeps artifacts immutable instead)."""
    out = Path(dataset_dir)
    report = read_report(out)
    if report["rows_ok"] == 0:
        gx_summary = {"success": False, "evaluated": 0, "failed": [{"expectation": "rows_ok > 0"}]}
    else:
        gx_summary = run_expectations(out, cfg)
    report["gx"] = {k: gx_summary[k] for k in ("success", "evaluated", "failed")}
    report["passed"] = bool(report["passed"] and gx_summary["success"])
    if write:
        (out / "gx_result.json").write_text(
            json.dumps(gx_summary, ensure_ascii=False, indent=2, default=str), encoding="utf-8"
        )
        (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        report["gx_result"] = gx_summary.get("result")
    return report


def enforce(report: dict[str, Any]) -> None:
    """Raise a one-line, actionable EcomcapError when the split must not be used."""
    split, rate, limit = report["split"], report["bad_rate"], report["max_bad_rate"]
    if report["rows_ok"] == 0:
        raise EcomcapError(
            f"{split}: no usable rows out of {report['rows_in']}; reasons: {_top(report)}"
        )
    if rate > limit:
        raise EcomcapError(
            f"{split}: {report['rows_quarantined'] - report.get('rows_filtered', 0)} of {report['rows_in']} rows "
            f"quarantined as bad ({rate:.1%}) > limit {limit:.1%}; top reasons: {_top(report)}; "
            "see quarantine.parquet, fix the source or raise max_bad_rate"
        )
    gx = report.get("gx")
    if gx and not gx["success"]:
        names = ", ".join(f"{f['expectation']}({f.get('column') or ''})" for f in gx["failed"])
        raise EcomcapError(f"{split}: data expectations failed: {names}; see gx_result.json")


def _top(report: dict[str, Any], n: int = 3) -> str:
    items = list(report["reasons"].items())[:n]
    return ", ".join(f"{k} {v}" for k, v in items) or "none"
