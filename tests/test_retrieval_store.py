"""The vector store in embedded mode (real Milvus Lite, no server) against exact search, and the
gallery artifact's checks."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index.gallery import ImageLookup, open_gallery
from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore
from ecomcap.retrieval.index.recall import ann_recall
from tests.conftest import make_image
from tests.retrieval_fixtures import random_gallery

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("index_type", ["HNSW", "FLAT"])
def test_embedded_store_search_and_recall_vs_exact(tmp_path, index_type):
    gallery = open_gallery(random_gallery(tmp_path / "g", n=1500))
    store = VectorStore(StoreConfig(uri=str(tmp_path / "milvus.db"), index_type=index_type, ef=32))
    try:
        name = store.ensure(gallery)
        assert store.count(name) == 1500
        assert store.ensure(gallery) == name and store.count(name) == 1500  # loaded once, not twice
        hits = store.search(name, gallery.vectors[[7, 99]], 5)
        assert [h[0].item_id for h in hits] == [gallery.item_ids[7], gallery.item_ids[99]]
        assert hits[0][0].row == 7 and abs(hits[0][0].score - 1.0) < 1e-4
        assert all(a.score >= b.score for a, b in zip(hits[0], hits[0][1:]))
        queries = np.random.default_rng(5).standard_normal((100, 32)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        recall = ann_recall(store, name, gallery, queries, k=10)
        assert recall == 1.0 if index_type == "FLAT" else recall >= 0.95
        other = open_gallery(random_gallery(tmp_path / "g2", n=50, seed=1))
        name2 = store.ensure(other)  # a new gallery version: its own collection, the old one kept
        assert name2 != name and store.count(name2) == 50 and store.count(name) == 1500
    finally:
        store.close()


def test_ann_recall_counts_tied_items_as_found(tmp_path):
    root = random_gallery(tmp_path / "g", n=40)
    v = np.load(root / "vectors.npy")
    v[20:] = v[0]  # 21 identical items: any 10 of them are a correct top-10
    np.save(root / "vectors.npy", v)
    gallery = open_gallery(root)
    store = VectorStore(StoreConfig(uri=str(tmp_path / "m.db"), index_type="FLAT"))
    try:
        assert ann_recall(store, store.ensure(gallery), gallery, v[:1], k=10) == 1.0
    finally:
        store.close()


def test_store_config_embedded_or_server():
    assert StoreConfig().embedded and StoreConfig(uri="/data/index.db").embedded
    assert not StoreConfig(uri="http://milvus.ecomcap.svc:19530").embedded
    with pytest.raises(ValueError):
        StoreConfig(url="http://x")  # unknown keys are errors, not ignored


def test_gallery_checks_and_image_lookup(tmp_path):
    root = random_gallery(tmp_path / "g", n=1100)
    lookup = ImageLookup(root / "images.parquet", cached_groups=1)
    assert lookup.get("it0_01099") == make_image("orange", (16, 16)) and lookup.get("nope") is None
    assert lookup.get("it0_00000") == make_image("red", (16, 16))  # across row groups, cache of 1

    v = np.load(root / "vectors.npy")
    np.save(root / "vectors.npy", v * 2)
    with pytest.raises(EcomcapError, match="L2-normalised"):
        open_gallery(root)
    np.save(root / "vectors.npy", v[:-1])
    with pytest.raises(EcomcapError, match="do not match index.json"):
        open_gallery(root)
    np.save(root / "vectors.npy", v)
    meta = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps({k: x for k, x in meta.items() if k != "fingerprint"}))
    with pytest.raises(EcomcapError, match="lacks fingerprint"):
        open_gallery(root)
    (root / "images.parquet").unlink()
    with pytest.raises(EcomcapError, match="missing images.parquet"):
        open_gallery(root)


def test_reopened_store_serves_the_existing_collection(tmp_path):
    """Another process (the CLI after the pipeline) finds the collection released: it must load
    it, not rebuild it, and search. (Within one process Milvus Lite keeps it loaded.)"""
    root = random_gallery(tmp_path / "g", n=300)
    build = ("import sys; from ecomcap.retrieval.index.gallery import open_gallery; "
             "from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore; "
             "s = VectorStore(StoreConfig(uri=sys.argv[2])); print(s.ensure(open_gallery(sys.argv[1]))); s.close()")
    out = subprocess.run([sys.executable, "-c", build, str(root), str(tmp_path / "m.db")], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    gallery = open_gallery(root)
    again = VectorStore(StoreConfig(uri=str(tmp_path / "m.db")))
    try:
        assert again.ensure(gallery) == out.stdout.split()[-1]
        name = out.stdout.split()[-1]
        assert again.search(name, gallery.vectors[[3]], 1)[0][0].item_id == gallery.item_ids[3]
    finally:
        again.close()


def test_tie_recall_counts_exact_and_tied_answers_only():
    from ecomcap.retrieval.index.recall import tie_recall

    v = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]  # rows 0 and 1 are the same vector
    q = v[:1]
    assert tie_recall(v, q, [[1]], k=1) == 1.0  # row 1 ties with the exact answer row 0
    assert tie_recall(v, q, [[2]], k=1) == 0.0
    assert tie_recall(v, q, [[0, 2]], k=2) == 0.5 and tie_recall(v, q, [[2, 3]], k=2) == 0.0
