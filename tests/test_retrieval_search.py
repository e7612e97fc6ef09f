"""Text search over a gallery: the searcher, `ecomcap search` (a gallery dir or the registry's
champion on a real SQLite MLflow store) and the search page's routes (FastAPI, in process)."""
import json

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient

from ecomcap.cli import main
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index.demo import demo_gallery
from ecomcap.retrieval.index.gallery import ImageLookup
from ecomcap.retrieval.index.milvus import StoreConfig
from ecomcap.retrieval.serve.page import create_app
from ecomcap.retrieval.serve.search import RETRIEVER, champion_gallery, open_searcher


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return demo_gallery(tmp_path_factory.mktemp("gallery") / "g", 400, seed=3)


@pytest.fixture(scope="module")
def searcher(gallery, tmp_path_factory):
    s = open_searcher(gallery)  # the gallery's recorded index (exact: demo galleries record none)
    yield s
    s.close()


def test_search_ranks_items_naming_the_query_words(searcher):
    out = searcher.search("红色连衣裙", 5)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    both = sum("红色" in t and "连衣裙" in t for t in searcher.gallery.texts)
    assert both >= 1
    assert all("红色" in r["text"] and "连衣裙" in r["text"] for r in out["results"][:min(both, 5)]), out
    assert all("连衣裙" in r["text"] or "红色" in r["text"] for r in out["results"]), out
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_rejects_bad_queries_and_a_mismatched_encoder(searcher, gallery, tmp_path):
    for query, top, msg in (("  ", 5, "empty query"), ("红色", 0, "between 1 and"), ("x" * 201, 5, "longer")):
        with pytest.raises(EcomcapError, match=msg):
            searcher.search(query, top)
    wrong = open_searcher(gallery, encode=lambda texts: np.ones((len(texts), 8), np.float32))
    with pytest.raises(EcomcapError, match="different versions"):
        wrong.search("红色", 3)


def test_cli_search_json_and_a_clear_error(gallery, tmp_path, capsys):
    store = str(tmp_path / "cli.db")
    assert main(["search", "蓝色 帽子", "--top", "3", "--gallery", str(gallery), "--index", "milvus", "--store-uri",
                 store, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["results"]) == 3 and all("帽子" in r["text"] for r in out["results"])
    assert main(["search", "蓝色", "--gallery", str(tmp_path / "none"), "--store-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a gallery artifact" in err[0]


def test_cli_search_uses_the_registered_champion(gallery, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(gallery), "retriever/gallery")
        client = mlflow.MlflowClient()
        client.create_registered_model(RETRIEVER)
        version = client.create_model_version(RETRIEVER, f"{run.info.artifact_uri}/retriever", run.info.run_id)
        assert main(["search", "x", "--tracking-uri", uri]) == 2  # registered, no champion yet
        assert "no 'serving' or 'champion' version of registered model 'ecomcap-retriever'" in capsys.readouterr().err
        client.set_registered_model_alias(RETRIEVER, "champion", version.version)
    finally:
        mlflow.set_tracking_uri(None)
    before = mlflow.get_tracking_uri()
    found = champion_gallery(uri, cache_dir=tmp_path / "dl")
    assert (found / "index.json").read_text() == (gallery / "index.json").read_text()
    assert mlflow.get_tracking_uri() == before  # the global MLflow URIs are left alone
    assert champion_gallery(uri, cache_dir=tmp_path / "dl") == found  # one download per version
    assert len([p for p in (tmp_path / "dl").rglob("vectors.npy")]) == 1
    assert main(["search", "红色连衣裙", "--top", "2", "--tracking-uri", uri, "--store-uri",
                 str(tmp_path / "c.db")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top 2 for “红色连衣裙”") and all("连衣裙" in line for line in lines[1:])


def test_page_api_and_images(searcher, gallery):
    client = TestClient(create_app(searcher, ImageLookup(gallery / "images.parquet")))
    page = client.get("/", params={"q": "红色连衣裙", "top": 4})
    assert page.status_code == 200 and page.text.count("<img src='/images/") == 4 and "连衣裙" in page.text
    first = searcher.search("红色连衣裙", 4)["results"][0]["item_id"]
    img = client.get(f"/images/{first}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content[:3] == b"\xff\xd8\xff"
    assert client.get("/images/nope").status_code == 404
    assert client.get("/api/search", params={"q": "蓝色", "top": 3}).json()["top"] == 3
    bad = client.get("/api/search", params={"q": " "})
    assert bad.status_code == 400 and "empty query" in bad.json()["error"]
    evil = client.get("/", params={"q": "<script>alert(1)</script>"})
    assert "<script>alert" not in evil.text and "&lt;script&gt;" in evil.text
    assert client.get("/", params={"q": "红色", "top": 1000}).status_code == 400
    assert client.get("/healthz").json()["items"] == 400


def test_search_a_gallery_embedded_by_the_trained_encoder(tmp_path):
    """The contract with training: a gallery from `embed_gallery` (tiny Chinese-CLIP encoder
    shipped inside it) is searched with that encoder's text tower; the store's answer is the
    exact top-k of the encoder's query vector."""
    from ecomcap.retrieval.evaluate.metrics import topk_search
    from ecomcap.retrieval.index.gallery import embed_gallery
    from ecomcap.retrieval.model.encoder import load_encoder, save_encoder
    from ecomcap.retrieval.model.tiny import build_tiny_encoder
    from tests.test_retrieval_encoder import SMALL, TEXTS, _items_dataset, _jpeg

    enc = load_encoder(build_tiny_encoder(tmp_path / "tiny", "chinese_clip", TEXTS, SMALL), device="cpu")
    enc_dir = save_encoder(enc.dual, enc.pre, tmp_path / "enc", item_embedding="fused", fusion_weight=0.5)
    rows = [(f"p{i}", _jpeg((40 * i % 256, 90, 200 - 30 * i % 200)), TEXTS[i % 3]) for i in range(12)]
    gallery = embed_gallery(enc_dir, _items_dataset(tmp_path / "items", rows), tmp_path / "gallery", batch_size=4)
    searcher = open_searcher(gallery, store=StoreConfig(uri=str(tmp_path / "m.db"), index_type="FLAT"))
    try:
        out = searcher.search("红色 条纹 T恤", 5)
        q = load_encoder(gallery / "encoder", device="cpu").encode_texts(["红色 条纹 T恤"])
        expected = [searcher.gallery.item_ids[i] for i in topk_search(q, searcher.gallery.vectors, 5)[1][0]]
        assert [r["item_id"] for r in out["results"]] == expected
    finally:
        searcher.close()


def test_page_errors_for_a_bad_top_and_images_of_ids_with_slashes(searcher, gallery, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = ImageLookup(gallery / "images.parquet").get(searcher.gallery.item_ids[0])
    pq.write_table(pa.table({"item_id": ["shop/a/123"], "image": [jpeg]}), tmp_path / "images.parquet")
    client = TestClient(create_app(searcher, ImageLookup(tmp_path / "images.parquet")))
    page = client.get("/", params={"q": "红色", "top": "abc"})
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert "top must be a whole number between 1 and 100, got &#x27;abc&#x27;" in page.text
    api = client.get("/api/search", params={"q": "红色", "top": "abc"})
    assert api.status_code == 400 and "top must be a whole number" in api.json()["error"]
    img = client.get("/images/shop%2Fa%2F123")
    assert img.status_code == 200 and img.content == jpeg
    assert client.get("/images/shop/a/123").status_code == 200
