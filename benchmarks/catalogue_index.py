"""The catalogue index job at catalogue size, through the job itself (`run_job`: ingest, embed,
recall check, registration, the `serving` alias) against a SQLite MLflow registry whose champion
is a tiny Chinese-CLIP: index N synthetic items (default 100,000), change --changed-share of them
(default 1%), re-index, and count what was embedded vs reused; the re-indexed vectors are
checked against a from-scratch embed of a sample. Reference in the same run: the first index
(every item embedded).

    python benchmarks/catalogue_index.py [--items 100000 --changed-share 0.01]

Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecomcap.config_encoders import TinyEncoderConfig  # noqa: E402
from ecomcap.retrieval.index.catalogue import (  # noqa: E402
    CatalogueConfig,
    IndexJobConfig,
    index_catalogue,
    ingest_catalogue,
)
from ecomcap.retrieval.index.gallery import load_gallery  # noqa: E402
from ecomcap.retrieval.index_job import run_job  # noqa: E402
from ecomcap.retrieval.model.encoder import load_encoder, save_encoder  # noqa: E402
from ecomcap.retrieval.model.tiny import build_tiny_encoder  # noqa: E402
from ecomcap.retrieval.serve.search import RETRIEVER  # noqa: E402

SEARCH = {"kind": "auto"}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--changed-share", type=float, default=0.01)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="catalogue_index_"))
    try:
        run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def register_champion(encoder: Path, work: Path) -> str:
    """A SQLite registry whose champion is `encoder` over a 40-item gallery (the retrieval
    pipeline's role); returns the tracking URI."""
    import mlflow

    from ecomcap.retrieval.serve.pyfunc import log_retriever

    uri = f"sqlite:///{work}/mlflow.db"
    small = index_catalogue(encoder, ingest_catalogue(CatalogueConfig(synthetic_items=40, seed=99,
                                                                      work_dir=work / "valid")),
                            work / "champion_gallery", None, SEARCH)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        model_uri = log_retriever(small)
    version = mlflow.register_model(model_uri, RETRIEVER).version
    mlflow.MlflowClient().set_registered_model_alias(RETRIEVER, "champion", version)
    mlflow.set_tracking_uri(None)
    return uri


def run(args, work: Path) -> None:
    tiny = TinyEncoderConfig(hidden=64, layers=2, heads=4, projection_dim=64, image_size=64, patch_size=16)
    enc = load_encoder(build_tiny_encoder(work / "tiny", "chinese_clip", ["红色连衣裙 蓝色条纹T恤"], tiny), device="cpu")
    encoder = save_encoder(enc.dual, enc.pre, work / "encoder", item_embedding="fused", fusion_weight=0.5)
    uri = register_champion(encoder, work)
    cfg = IndexJobConfig.model_validate({
        "catalogue": {"synthetic_items": args.items, "seed": 0, "image_size": 64, "batch_size": 256,
                      "work_dir": str(work / "catalogue")},
        "registry": {"model_name": RETRIEVER, "tracking_uri": uri, "primary_metric": "MeanRecall"}, "device": "cpu"})
    first, job1_s = timed(run_job, cfg)
    print(f"v1: {first} in {job1_s}s", flush=True)
    update = cfg.model_copy(update={"catalogue": cfg.catalogue.model_copy(update={"changed_share": args.changed_share})})
    second, job2_s = timed(run_job, update)
    print(f"v2: {second} in {job2_s}s", flush=True)
    g1, g2 = Path(first["gallery"]), Path(second["gallery"])
    m1, m2 = (json.loads((g / "index.json").read_text()) for g in (g1, g2))
    rows = lambda g: [json.loads(x) for x in (g / "items.jsonl").read_text().splitlines()]  # noqa: E731
    h1 = {r["item_id"]: r["content_hash"] for r in rows(g1)}
    r2 = rows(g2)
    changed = sum(h1.get(r["item_id"]) != r["content_hash"] for r in r2)
    # the reused vectors are the ones a fresh embed gives: re-embed a sample of 512 items from scratch
    gal2 = load_gallery(g2)
    sample = np.random.default_rng(0).choice(len(r2), 512, replace=False)
    import io

    from PIL import Image
    imgs = {r: Image.open(io.BytesIO(b)).convert("RGB") for r, b in
            zip(sample, (gal2.images([gal2.item_ids[i] for i in sample])[gal2.item_ids[i]] for i in sample))}
    fresh = load_encoder(encoder, device="cpu").encode_items([imgs[i] for i in sample], [gal2.texts[i] for i in sample],
                                                             mode="fused")
    max_diff = float(np.abs(fresh - gal2.vectors[sample]).max())
    out = {"items": args.items, "changed_share": args.changed_share, "changed_items": changed,
           "embedded_v1": m1["embedding"]["embedded"], "embedded_v2": m2["embedding"]["embedded"],
           "reused_v2": m2["embedding"]["reused"], "job_v1_s": job1_s, "job_v2_s": job2_s,
           "serving_versions": [first["version"], second["version"]], "alias_moved": [first["alias_moved"],
                                                                                     second["alias_moved"]],
           "index_recall10": [first["recall"], second["recall"]],
           "rejob_speedup_vs_full": round(job1_s / max(job2_s, 1e-9), 1),
           "sample_max_abs_diff_vs_fresh": round(max_diff, 7), "distinct_texts": len({r["text"] for r in r2})}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
