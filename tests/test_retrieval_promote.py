"""Retriever promotion on a real SQLite MLflow registry with tiny encoders: what identifies a
version (encoder AND gallery index), a second version, the champion's re-evaluation, a rejection."""
import os

import mlflow
import pytest

from ecomcap.retrieval.config import (
    EncoderConfig,
    RetrievalDataConfig,
    RetrievalRunConfig,
    RetrievalSynthConfig,
)
from ecomcap.retrieval.data.prepare import prepare_retrieval_data
from ecomcap.retrieval.evaluate.promote import promote_retriever
from ecomcap.retrieval.index.gallery import embed_gallery
from ecomcap.retrieval.model.tiny import ensure_tiny_encoder
from ecomcap.retrieval.workflow import evaluate_stage
from tests.test_retrieval_train import TINY


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpromote")
    data = prepare_retrieval_data(RetrievalDataConfig(
        work_dir=root / "data", synth=RetrievalSynthConfig(train_products=8, valid_products=8, image_size=32, seed=5)))
    uri = f"sqlite:///{root}/mlflow.db"
    base = RetrievalRunConfig(encoder=EncoderConfig(name_or_path=str(root / "tiny"), tiny=TINY, device="cpu"))
    cfg = base.model_copy(update={
        "data": base.data.model_copy(update={"work_dir": root / "data"}),
        "registry": base.registry.model_copy(update={"tracking_uri": uri, "model_name": "retriever-test",
                                                     "floor": 0.0, "min_rel_gain": 0.01,
                                                     "bootstrap_resamples": 200})})
    ensure_tiny_encoder(cfg.encoder.name_or_path, cfg.encoder.arch, ["红色 T恤 连衣裙"], TINY, cfg.encoder.max_text_len)
    mlflow.set_tracking_uri(uri)
    yield root, data, cfg
    # promote opens its run under set_experiment, which also pins MLFLOW_EXPERIMENT_ID: undo both
    # so later test modules on other stores start clean
    mlflow.set_tracking_uri(None)
    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def _promote(gallery, data, cfg):
    metrics, eval_fp, _ = evaluate_stage(gallery, data["valid"], data["train"], cfg, log=False)
    return promote_retriever(gallery, data["valid"], metrics, eval_fp, cfg)


def test_a_new_gallery_is_a_new_version_and_the_champion_is_rescored(setup):
    root, data, cfg = setup
    first = embed_gallery(cfg.encoder.name_or_path, data["valid"] / "items", root / "g1")
    d1 = _promote(first, data, cfg)
    assert d1.promote and d1.candidate_version == "1"
    again = _promote(first, data, cfg)  # the very same encoder and index: no duplicate version
    assert again.candidate_version == "1"
    # the same encoder over another item set must not reuse version 1 (whose index is the old one)
    other = embed_gallery(cfg.encoder.name_or_path, data["train"] / "items", root / "g2")
    d2 = _promote(other, data, cfg)
    assert d2.candidate_version == "2" and d2.champion_version == "1"
    assert not d2.promote and d2.champion_after == "1"  # worse than the champion's stored scores


def test_the_champion_is_re_evaluated_on_a_new_eval_set_and_an_equal_candidate_is_rejected(setup):
    root, _, cfg = setup
    data = prepare_retrieval_data(RetrievalDataConfig(
        work_dir=root / "data2", synth=RetrievalSynthConfig(train_products=4, valid_products=8, image_size=32, seed=9)))
    gallery = embed_gallery(cfg.encoder.name_or_path, data["valid"] / "items", root / "g3")
    before = str(mlflow.MlflowClient(cfg.registry.tracking_uri).get_model_version_by_alias(
        "retriever-test", "champion").version)
    d = _promote(gallery, data, cfg)
    assert d.champion_version == before and d.candidate_version != before
    assert any("re-evaluated on the current eval set" in r for r in d.reasons), d.reasons
    # the champion's own encoder re-embedded the new items: the same encoder scores the same,
    # which is no gain (min_rel_gain 1%)
    assert d.champion["metrics"]["MeanRecall"] == pytest.approx(d.candidate["metrics"]["MeanRecall"])
    assert not d.promote and d.champion_after == before
