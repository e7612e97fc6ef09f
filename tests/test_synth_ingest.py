"""The synthetic set with injected faults, through ingest: exactly the injected rows are quarantined."""
import json

import pyarrow.parquet as pq
import pytest

from ecomcap.config import IngestConfig
from ecomcap.data.ingest import ingest_split
from ecomcap.data.shards import read_references
from ecomcap.data.synth import generate_synthetic


@pytest.fixture(scope="module", params=["easy", "hard"])
def corrupted(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("synth")
    summary = generate_synthetic(root, train=240, valid=40, test=8, seed=3, corrupt_rate=0.12,
                                 difficulty=request.param)
    return root, summary, json.loads((root / "corruptions.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("split", ["train", "valid"])
def test_quarantine_matches_injected_faults(corrupted, tmp_path, split):
    root, summary, faults = corrupted
    rep = ingest_split(root, split, tmp_path / split, IngestConfig(max_bad_rate=0.5)).report
    q = pq.read_table(tmp_path / split / "quarantine.parquet").to_pylist()
    # rows without a usable image id are identified by (file, line); the rest by image id
    by_line = {"malformed_line", "bad_json", "duplicate_id", "captions_without_image"}
    got = sorted(
        (r["reason"], str((r["source"], r["line_no"]) if r["reason"] in by_line else r["image_id"]))
        for r in q
    )
    want = sorted(
        (f["expected_reason"], str((f["file"], f["line"]) if f["expected_reason"] in by_line else f["image_id"]))
        for f in faults
        if f["split"] == split and f["expected_reason"] is not None
    )
    assert got == want
    assert rep["rows_ok"] == summary[split]["clean_images"]
    assert rep["rows_in"] == rep["rows_ok"] + rep["rows_quarantined"]


def test_fixable_references_are_cleaned_not_dropped(corrupted, tmp_path):
    root, _, faults = corrupted
    ingest_split(root, "train", tmp_path / "t", IngestConfig(max_bad_rate=0.5))
    refs = read_references(tmp_path / "t")
    fixable = [f for f in faults if f["split"] == "train" and f["expected_reason"] is None]
    assert fixable
    for f in fixable:
        texts = refs[f["image_id"]]
        assert all("<|" not in t and "　" not in t for t in texts)
        assert all(not any("\uff10" <= ch <= "\uff5a" for ch in t) for t in texts)
        if f["note"] == "truncated_after_stop":
            assert all(t.endswith("。") or "。" not in t for t in texts)


def test_clean_test_split(corrupted, tmp_path):
    root, summary, _ = corrupted
    rep = ingest_split(root, "test", tmp_path / "test", IngestConfig()).report
    assert (rep["rows_ok"], rep["rows_quarantined"]) == (summary["test"]["images"], 0)
