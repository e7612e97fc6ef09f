"""ingest -> validate -> train -> embed gallery -> evaluate -> promote, for product retrieval.

    zenml pipeline run pipelines.retrieval.retrieval_pipeline -c configs/retrieval_local.yaml
"""
from __future__ import annotations

import hashlib
import json

from zenml import Model, pipeline
from zenml.config import CachePolicy

from ecomcap.retrieval.config import RetrievalDataConfig, RetrievalRunConfig
from ecomcap.workflow import library_fingerprint
from steps.retrieval import embed_gallery, retrieval_evaluate, retrieval_ingest, retrieval_train, retrieval_validate

MODEL = Model(name="ecomcap-retriever", description="Chinese product search dual encoder + gallery index")


def retrieval_source_fingerprint(data: RetrievalDataConfig) -> str:
    """The synthetic settings, or the raw files' names, sizes and mtimes (plus ingest settings)."""
    from pathlib import Path

    h = hashlib.sha256(json.dumps([data.source, data.synth.model_dump(mode="json"),
                                   data.ingest.model_dump(mode="json")], sort_keys=True).encode())
    if data.source != "synthetic" and data.src_dir is not None and Path(data.src_dir).exists():
        for p in sorted(Path(data.src_dir).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(data.src_dir)}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


@pipeline(model=MODEL, enable_cache=True, cache_policy=CachePolicy(cache_func=library_fingerprint))
def retrieval_pipeline(config: RetrievalRunConfig = RetrievalRunConfig()) -> None:  # noqa: B008
    train, valid = retrieval_ingest(config=config, source_fingerprint=retrieval_source_fingerprint(config.data))
    retrieval_validate(config=config, train=train, valid=valid)
    model = retrieval_train(config=config, train=train, valid=valid, after="retrieval_validate")
    gallery = embed_gallery(config=config, model=model, valid=valid)
    retrieval_evaluate(config=config, gallery=gallery, valid=valid, train=train)
