"""Register the retriever (encoder + gallery index, one pyfunc) and run the shared promotion gate:
MeanRecall with a paired bootstrap over queries, R@1 as a guard, same-eval-set rule.

The champion is re-scored on the current valid set by re-embedding that set's items with the
champion's own encoder, so both sides are compared on identical queries and gallery.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ecomcap.retrieval.config import RetrievalRunConfig
from ecomcap.retrieval.model.dual import SETTINGS, detect_arch

SCORE_KEYS = ("R1", "R5", "R10", "MeanRecall", "index_recall10")


def _scores(metrics: dict[str, Any], eval_fp: str):
    from ecomcap.registry.gate import Scores

    return Scores(metrics={k: float(metrics[k]) for k in SCORE_KEYS if k in metrics}, eval_fingerprint=eval_fp,
                  per_item={str(q): float(v) for q, v in metrics["per_query"].items()})


def promote_retriever(gallery_dir: Path, valid: Path, metrics: dict[str, Any], eval_fp: str,
                      cfg: RetrievalRunConfig, tags: dict[str, str] | None = None):
    """Register (or reuse) the candidate and gate it against the champion; returns the Decision."""
    from ecomcap.registry.register import download_version, register_and_gate
    from ecomcap.retrieval.index.gallery import embed_gallery
    from ecomcap.retrieval.serve.pyfunc import log_retriever
    from ecomcap.retrieval.workflow import score_gallery

    index = json.loads((gallery_dir / "index.json").read_text(encoding="utf-8"))
    encoder_dir = gallery_dir / index["encoder_dir"]
    settings_file = encoder_dir / SETTINGS  # absent for a zero-shot (hub-layout) encoder
    settings = (json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file()
                else {"arch": detect_arch(encoder_dir)})
    # the gallery index is part of the version: the same encoder over new items is a new version
    inference = {"item_embedding": index["item_embedding"], "fusion_weight": index["fusion_weight"],
                 "arch": settings.get("arch"), "max_text_len": settings.get("max_text_len"),
                 "gallery": index["fingerprint"], "search": index.get("search")}

    def reevaluate(version: str):
        with tempfile.TemporaryDirectory(prefix="ecomcap-champion-") as tmp:
            champion = download_version(cfg.registry, version, "vectors.npy", Path(tmp) / "model")
            meta = json.loads((champion / "index.json").read_text("utf-8"))
            fresh = embed_gallery(champion / meta["encoder_dir"], valid / "items", Path(tmp) / "gallery",
                                  device=cfg.encoder.torch_device(),  # searched the way it is served
                                  search=meta.get("search") or cfg.index.model_dump(mode="json"))
            scores = score_gallery(fresh, valid, cfg)
            return _scores({k.replace("@", ""): v for k, v in scores.items()} | {"per_query": scores["per_query"]},
                           eval_fp)

    from ecomcap.registry import tracking

    tags = {"config_hash": tracking.config_hash(cfg), "gallery_fingerprint": index["fingerprint"], **(tags or {})}
    return register_and_gate(
        cfg.registry, model_dir=encoder_dir, inference=inference, log_model=lambda _: log_retriever(gallery_dir),
        scores=_scores(metrics, eval_fp), reevaluate=reevaluate, tags=tags,
        description="ecomcap: Chinese product search dual encoder with its gallery index",
        trained_as=f"{tags.get('source_fingerprint', '')}/{tags['config_hash']}")
