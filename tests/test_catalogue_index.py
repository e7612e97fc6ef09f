"""The catalogue index job: a catalogue (any item set) embedded by the champion's encoder into a
gallery version of its own, registered and aliased `serving` without moving the champion, and
re-indexing after a change embeds only the changed items (item id + content hash)."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from ecomcap.retrieval.index.catalogue import (
    SERVING,
    CatalogueConfig,
    IndexJobConfig,
    index_catalogue,
    ingest_catalogue,
)
from ecomcap.retrieval.index.gallery import embed_gallery, load_gallery
from ecomcap.retrieval.index_job import run_job
from ecomcap.retrieval.model.encoder import load_encoder, save_encoder
from ecomcap.retrieval.model.tiny import build_tiny_encoder
from ecomcap.retrieval.serve.search import RETRIEVER
from tests.test_retrieval_encoder import SMALL, TEXTS

SEARCH = {"kind": "auto"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    enc = load_encoder(build_tiny_encoder(root / "tiny", "chinese_clip", TEXTS + ["红色连衣裙"], SMALL), device="cpu")
    return save_encoder(enc.dual, enc.pre, root / "encoder", item_embedding="fused", fusion_weight=0.5)


def _catalogue(tmp_path, name, changed=0.0, n=200):
    return CatalogueConfig(synthetic_items=n, changed_share=changed, work_dir=tmp_path / name, image_size=32, seed=4)


def _hashes(gallery):
    return {r["item_id"]: r["content_hash"] for r in map(json.loads, (gallery / "items.jsonl").read_text().splitlines())}


def test_reindexing_embeds_only_changed_items(encoder, tmp_path):
    first = index_catalogue(encoder, ingest_catalogue(_catalogue(tmp_path, "v1")), tmp_path / "g1", None, SEARCH)
    meta1 = json.loads((first / "index.json").read_text())
    assert meta1["embedding"] == {"embedded": 200, "reused": 0, "previous": None}
    items2 = ingest_catalogue(_catalogue(tmp_path, "v2", changed=0.05))
    second = index_catalogue(encoder, items2, tmp_path / "g2", first, SEARCH)
    h1, h2 = _hashes(first), _hashes(second)
    changed = sum(h1.get(i) != h for i, h in h2.items())
    meta2 = json.loads((second / "index.json").read_text())
    assert 1 <= changed <= 10 and meta2["embedding"]["embedded"] == changed
    assert meta2["embedding"]["reused"] == 200 - changed
    fresh = embed_gallery(encoder, items2, tmp_path / "g2_fresh", search=SEARCH)  # the same vectors from scratch
    assert np.allclose(load_gallery(second).vectors, load_gallery(fresh).vectors, atol=1e-5)
    assert meta2["fingerprint"] != meta1["fingerprint"]
    other = save_encoder(*_other_encoder(tmp_path), tmp_path / "other", item_embedding="fused", fusion_weight=0.5)
    third = index_catalogue(other, items2, tmp_path / "g3", second, SEARCH)
    assert json.loads((third / "index.json").read_text())["embedding"]["reused"] == 0  # another encoder: all new


def _other_encoder(tmp_path):
    from ecomcap.config_encoders import TinyEncoderConfig

    enc = load_encoder(build_tiny_encoder(tmp_path / "tiny2", "chinese_clip", TEXTS,
                                          TinyEncoderConfig(**{**SMALL.model_dump(), "seed": 7})), device="cpu")
    return enc.dual, enc.pre


def test_index_job_aliases_serving_and_leaves_the_champion(encoder, tmp_path):
    from ecomcap.retrieval.index.catalogue import ingest_catalogue as ingest
    from ecomcap.retrieval.serve.pyfunc import log_retriever

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    gate_gallery = index_catalogue(encoder, ingest(_catalogue(tmp_path, "valid", n=40)), tmp_path / "gate", None, SEARCH)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            model_uri = log_retriever(gate_gallery)
        champion = mlflow.register_model(model_uri, RETRIEVER).version
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(RETRIEVER, "champion", champion)
    finally:
        mlflow.set_tracking_uri(None)
    cfg = IndexJobConfig.model_validate({"catalogue": _catalogue(tmp_path, "cat").model_dump(),
                                         "registry": {"model_name": RETRIEVER, "tracking_uri": uri,
                                                      "primary_metric": "MeanRecall"}, "device": "cpu"})
    first = run_job(cfg)
    # no serving version yet: the champion's gallery is the previous one (same encoder, and its 40
    # items are the catalogue's first 40: same seed)
    assert first["alias_moved"] and (first["embedded"], first["reused"]) == (160, 40) and first["recall"] == 1.0
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias(RETRIEVER, SERVING).version) == first["version"]
    assert str(client.get_model_version_by_alias(RETRIEVER, "champion").version) == str(champion)
    update = cfg.model_copy(update={"catalogue": cfg.catalogue.model_copy(update={"changed_share": 0.05})})
    second = run_job(update)
    assert second["reused"] >= 190 and second["embedded"] == 200 - second["reused"] and second["embedded"] >= 1
    assert str(client.get_model_version_by_alias(RETRIEVER, SERVING).version) == second["version"]
    assert str(client.get_model_version_by_alias(RETRIEVER, "champion").version) == str(champion)
