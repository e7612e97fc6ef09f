"""Retrieval ingest: MUGE MR, seed 002's variant, Shopee CSV; quarantine reasons; counts conserved;
the synthetic set's determinism and structure."""
import csv
import json

import pyarrow.parquet as pq
import pytest

from ecomcap.data.formats import encode_base64
from ecomcap.data.shards import read_table
from ecomcap.retrieval.config import RetrievalSynthConfig
from ecomcap.retrieval.data.ingest import ingest_retrieval_split, read_groups, read_queries
from ecomcap.retrieval.data.synth import generate_retrieval_synthetic
from tests.conftest import make_image


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")


def _reasons(path):
    return sorted(pq.read_table(path).column("reason").to_pylist())


def _conserved(report):
    items, queries = report["items"], report.get("queries")
    assert items["rows_in"] == items["rows_ok"] + items["rows_quarantined"]
    if queries:
        assert queries["rows_in"] == queries["rows_ok"] + queries["rows_quarantined"]
        assert queries["refs_in"] == queries["refs_kept"] + queries["refs_dropped"]


def test_muge_format_quarantines_each_fault_with_its_reason(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = encode_base64(make_image("red"))
    (src / "MR_valid_imgs.tsv").write_text(
        f"1\t{good}\n2\t{encode_base64(make_image('blue'))}\n3\t@@notbase64@@\n"
        f"4\t{encode_base64(b'not an image')}\n2\t{good}\n5\t{good}\n", encoding="utf-8")
    _jsonl(src / "MR_valid_item_texts.jsonl", [{"item_id": "1", "text": "红色 T恤"}, {"item_id": "9", "text": "孤儿"}])
    _jsonl(src / "MR_valid_queries.jsonl", [
        {"query_id": 10, "query_text": "红色", "item_ids": [1, 2, 7]},   # 7: orphan link
        {"query_id": 11, "query_text": "坏图", "item_ids": [3, 4]},      # no valid item
        {"query_id": 10, "query_text": "重复", "item_ids": [1]},         # duplicate id
        "{not json",
        {"query_id": 12, "query_text": "", "item_ids": [1]},             # malformed
        {"query_id": 13, "query_text": "五", "item_ids": [5, 5]},        # duplicate link
    ])
    report = ingest_retrieval_split(src, "valid", tmp_path / "out", "muge")
    _conserved(report)
    items, queries = report["items"], report["queries"]
    assert items["rows_ok"] == 3 and items["reasons"] == {
        "bad_base64": 1, "bad_image": 1, "duplicate_id": 1, "id_without_image": 1}
    assert queries["rows_in"] == 6 and queries["rows_ok"] == 2
    assert queries["reasons"] == {"orphan_item_id": 3, "query_without_valid_item": 1, "duplicate_query_id": 1,
                                  "bad_json": 1, "malformed_query": 1, "duplicate_item_link": 1}
    assert {q["query_id"]: q["item_ids"] for q in read_queries(tmp_path / "out")} == {"10": ["1", "2"], "13": ["5"]}
    table = read_table(tmp_path / "out" / "items", ["image_id", "texts"]).to_pylist()
    assert table[0] == {"image_id": "1", "texts": ["红色T恤"]}  # cleaned like captions and table[1]["texts"] == []
    assert _reasons(tmp_path / "out" / "queries_quarantine.parquet").count("orphan_item_id") == 3


def test_seed002_variant_merges_pair_rows_and_reads_item_texts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = encode_base64(make_image("green"))
    (src / "MR_train_imgs.tsv").write_text(f"97905\t{img}\n97906\t{img}\n", encoding="utf-8")
    rows = [{"query_id": 1, "query_text": "Phone case clay", "image_id": 97905, "text_input": ["a", "b", "c"]},
            {"query_id": 1, "query_text": "Phone case clay", "image_id": 97906, "text_input": ["d"]}]
    (src / "MR_train_queries_with_captions.json").write_text(json.dumps(rows), encoding="utf-8")
    report = ingest_retrieval_split(src, "train", tmp_path / "train", "seed002")
    _conserved(report)
    assert report["queries"]["rows_in"] == 1 and report["queries"]["refs_kept"] == 2
    assert read_queries(tmp_path / "train") == [{"query_id": "1", "query_text": "Phone case clay",
                                                 "item_ids": ["97905", "97906"]}]
    texts = read_table(tmp_path / "train" / "items", ["texts"]).column("texts").to_pylist()
    assert texts == [["a", "b", "c"], ["d"]]
    (src / "MR_valid_imgs.tsv").write_text(f"1006938\t{img}\n", encoding="utf-8")
    _jsonl(src / "MR_valid_queries_with_captions_standard_simple.jsonl", [
        {"query_id": 248816, "query_text": "Christmas pillow", "item_ids": {"1006938": "Green cushion", "561749": "x"}}])
    report = ingest_retrieval_split(src, "valid", tmp_path / "valid", "seed002")
    _conserved(report)
    assert report["queries"]["reasons"] == {"orphan_item_id": 1}
    assert report["items"]["reasons"] == {"id_without_image": 1}


def test_shopee_csv_with_image_folder(tmp_path):
    src = tmp_path / "shopee"
    (src / "train_images").mkdir(parents=True)
    (src / "train_images" / "a.jpg").write_bytes(make_image("red"))
    (src / "train_images" / "b.jpg").write_bytes(make_image("red"))
    with open(src / "train.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["posting_id", "image", "image_phash", "title", "label_group"])
        w.writerows([["p1", "a.jpg", "f0", "Red shirt", "249114794"], ["p2", "b.jpg", "f1", "Red tee", "249114794"],
                     ["p3", "missing.jpg", "f2", "Gone", "7"], ["p1", "a.jpg", "f0", "dup", "249114794"]])
    report = ingest_retrieval_split(src, "train", tmp_path / "out", "shopee")
    _conserved(report)
    assert report["items"]["reasons"] == {"missing_image_file": 1, "duplicate_id": 1}
    assert read_groups(tmp_path / "out") == {"p1": "249114794", "p2": "249114794"}
    assert report["groups"] == 1 and "queries" not in report


def test_synthetic_set_is_deterministic_and_muge_shaped(tmp_path):
    cfg = RetrievalSynthConfig(train_products=20, valid_products=20, image_size=48)
    a = generate_retrieval_synthetic(tmp_path / "a", cfg)
    generate_retrieval_synthetic(tmp_path / "b", cfg)
    for name in ("MR_valid_imgs.tsv", "MR_valid_queries.jsonl", "MR_valid_item_texts.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    queries = [json.loads(x) for x in (tmp_path / "a" / "MR_valid_queries.jsonl").read_text("utf-8").splitlines()]
    groups = {json.loads(x)["item_id"]: json.loads(x) for x in
              (tmp_path / "a" / "MR_valid_groups.jsonl").read_text("utf-8").splitlines()}
    assert queries and all(1 <= len(q["item_ids"]) <= 10 for q in queries)
    for q in queries:  # every matching item is a positive, and only those
        words = set(q["query_text"].split())
        match = {i for i, g in groups.items() if words <= {g["colour"], g["pattern"], g["category"], g["brand"]}}
        assert set(q["item_ids"]) == match
    assert a["valid"]["groups"] == 40  # base products + one one-attribute distractor each
    report = ingest_retrieval_split(tmp_path / "a", "valid", tmp_path / "ing", "muge")
    assert report["passed"] and report["items"]["rows_ok"] == a["valid"]["items"]


def test_the_pipeline_config_rejects_shopee_in_one_line(tmp_path):
    """Shopee has no queries.parquet: refused when the run config loads, not by a raw
    FileNotFoundError deep in training."""
    from ecomcap.config import load_run_config
    from ecomcap.errors import EcomcapError
    from ecomcap.retrieval.config import RetrievalRunConfig

    cfg = tmp_path / "run.yaml"
    cfg.write_text("parameters:\n  config:\n    data:\n      source: shopee\n      src_dir: /data/shopee\n",
                   encoding="utf-8")
    with pytest.raises(EcomcapError) as err:
        load_run_config(cfg, RetrievalRunConfig)
    assert "'shopee' has no search queries" in str(err.value)


def test_retrieval_config_settings_that_did_nothing_are_gone_and_device_is_used(tmp_path, monkeypatch):
    """eval.top_k and gallery_dir were accepted and ignored: now refused; encoder.device reaches
    the gallery embedding (and evaluation / champion re-scoring through the same call)."""
    from ecomcap.config import load_run_config
    from ecomcap.errors import EcomcapError
    from ecomcap.retrieval.config import RetrievalRunConfig
    from ecomcap.retrieval.model import encoder
    from ecomcap.retrieval.workflow import embed_stage

    for extra in ("    gallery_dir: .run/g\n", "    eval: {top_k: 10}\n"):
        cfg = tmp_path / "run.yaml"
        cfg.write_text("parameters:\n  config:\n" + extra, encoding="utf-8")
        with pytest.raises(EcomcapError):
            load_run_config(cfg, RetrievalRunConfig)
    seen = []

    def spy(path, device=None, trust_remote_code=False):
        seen.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(encoder, "load_encoder", spy)  # imported where it is used
    cfg = RetrievalRunConfig.model_validate({"encoder": {"device": "cpu"}, "data": {"work_dir": str(tmp_path / "d")}})
    with pytest.raises(RuntimeError, match="stop here"):
        embed_stage(tmp_path / "model", tmp_path / "valid", cfg)
    assert seen == ["cpu"]


def test_retrieval_validate_stage_records_splits_like_captioning(tmp_path):
    """One dataset recorder for both jobs (ecomcap.workflow.record_datasets): each split with its
    ingested directory as source, the shared context names and its row counts."""
    import mlflow

    from ecomcap.retrieval.config import RetrievalDataConfig, RetrievalRunConfig
    from ecomcap.retrieval.data.prepare import prepare_retrieval_data
    from ecomcap.retrieval.workflow import validate_stage

    data = prepare_retrieval_data(RetrievalDataConfig(
        work_dir=tmp_path / "d", synth=RetrievalSynthConfig(train_products=4, valid_products=4, image_size=32)))
    cfg = RetrievalRunConfig.model_validate({"data": {"work_dir": str(tmp_path / "d")}})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            reports = validate_stage({"train": data["train"], "valid": data["valid"]}, cfg)
        inputs = {di.dataset.name: (di.dataset, {t.key: t.value for t in di.tags})
                  for di in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    finally:
        mlflow.set_tracking_uri(None)
    assert set(inputs) == {"retrieval-train", "retrieval-valid"}
    for split, context in (("train", "training"), ("valid", "validation")):
        ds, tags = inputs[f"retrieval-{split}"]
        assert tags["mlflow.data.context"] == context and str(data[split]) in ds.source
        assert tags["rows_ok"] == str(reports[split]["items"]["rows_ok"])
