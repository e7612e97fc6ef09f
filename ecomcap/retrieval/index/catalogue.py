"""The catalogue index job: the champion's encoder x a catalogue -> a gallery version of its own,
registered beside the gated model and aliased `serving`, without touching the gate's eval set.

    ecomcap index-catalogue --config configs/retrieval_index.yaml [--synthetic 100000]
    zenml pipeline run pipelines.index.index_pipeline -c configs/retrieval_index.yaml

This module holds the catalogue's config, ingest and incremental embedding; the registry side
(recall check, registration, the `serving` alias) is `ecomcap.retrieval.index_job`.

The catalogue: MUGE-format ``MR_<split>_imgs.tsv`` (+ ``MR_<split>_item_texts.jsonl``)
in `src_dir`, or a synthetic one. Items go through the same ingest as training data (image checks,
quarantine, counts). Re-indexing reuses the previous `serving` gallery's vectors for items whose
id and content hash are unchanged (`embed_gallery(previous=...)`): only changed items are embedded.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from ecomcap.config import IngestConfig, RegistryConfig
from ecomcap.config_base import _Strict
from ecomcap.retrieval.config import retriever_registry
from ecomcap.retrieval.index.base import IndexConfig

log = logging.getLogger(__name__)
SERVING = "serving"


class CatalogueConfig(_Strict):
    """Which items to index and where the job works."""

    source: Literal["synthetic", "muge"] = "synthetic"
    src_dir: Path | None = Field(None, description="muge: the directory holding MR_<split>_imgs.tsv (+ item texts)")
    split: str = Field("catalogue", description="the file prefix: MR_<split>_imgs.tsv")
    synthetic_items: int = Field(2000, ge=1, description="synthetic: catalogue size")
    changed_share: float = Field(0.0, ge=0, le=1, description="synthetic: share of items redrawn (a catalogue update)")
    seed: int = 0
    image_size: int = Field(64, ge=16)
    work_dir: Path = Path(".run/retrieval/catalogue")
    batch_size: int = Field(256, ge=1)
    encoder: Literal["champion", "serving"] = Field(
        "champion", description="whose encoder embeds the catalogue: the gate's champion (a new champion "
        "re-embeds everything) or the current serving version's")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    recall_queries: int = Field(200, ge=1, description="item texts used as queries for the index recall check")


def synth_catalogue(out_dir: str | Path, cfg: CatalogueConfig) -> Path:
    """MUGE-format catalogue files of `synthetic_items` drawn products (one drawing per distinct
    text, many sellers per product); `changed_share` of them redrawn with one attribute changed."""
    from ecomcap.data.formats import write_image_tsv, write_jsonl
    from ecomcap.data.synth_draw import random_attributes
    from ecomcap.retrieval.data.synth import one_attribute_variant
    from ecomcap.retrieval.index.demo import item_text, product_images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    attrs = [random_attributes(rng) for _ in range(cfg.synthetic_items)]
    change = random.Random(f"{cfg.seed}-change")
    for i in change.sample(range(len(attrs)), round(cfg.changed_share * len(attrs))):
        attrs[i] = one_attribute_variant(attrs[i], change)
    products = [(f"cat_{i:07d}", a) for i, a in enumerate(attrs)]
    write_image_tsv(out / f"MR_{cfg.split}_imgs.tsv", product_images(products, cfg.seed, cfg.image_size))
    write_jsonl(out / f"MR_{cfg.split}_item_texts.jsonl",
                ({"item_id": item_id, "text": item_text(a)} for item_id, a in products))
    return out


def ingest_catalogue(cfg: CatalogueConfig) -> Path:
    """The catalogue as an item dataset (``<work_dir>/items``), through the shared ingest."""
    from ecomcap.errors import EcomcapError
    from ecomcap.retrieval.data.ingest import ingest_retrieval_split
    from ecomcap.retrieval.data.prepare import enforce_retrieval

    if cfg.source == "synthetic":
        src = synth_catalogue(Path(cfg.work_dir) / "raw", cfg)
    elif cfg.src_dir is None:
        raise EcomcapError("catalogue.source is 'muge' but catalogue.src_dir is not set")
    else:
        src = Path(cfg.src_dir)
    out = Path(cfg.work_dir) / "ingested"
    report = ingest_retrieval_split(src, cfg.split, out, "muge", cfg.ingest, with_queries=False)
    enforce_retrieval(report)
    log.info("catalogue: %d items in, %d ok, %d quarantined", report["items"]["rows_in"], report["items"]["rows_ok"],
             report["items"]["rows_quarantined"])
    return out / "items"


def index_catalogue(encoder_dir: Path, items_dir: Path, out_dir: Path, previous: Path | None, search: dict,
                    batch_size: int = 256, device: str | None = None) -> Path:
    """Embed the catalogue (reusing `previous`'s unchanged vectors) into a gallery version."""
    from ecomcap.retrieval.index.gallery import embed_gallery

    return embed_gallery(encoder_dir, items_dir, out_dir, batch_size=batch_size, device=device, search=search,
                         previous=previous)


class IndexJobConfig(_Strict):
    """The index job as one config (configs/retrieval_index.yaml: parameters.config has this shape)."""

    catalogue: CatalogueConfig = Field(default_factory=CatalogueConfig)
    index: IndexConfig = Field(default_factory=IndexConfig, description="the catalogue's search index; an "
                               "approximate one below min_recall is registered but not aliased `serving`")
    registry: RegistryConfig = Field(default_factory=lambda: retriever_registry())
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def torch_device(self) -> str | None:
        return None if self.device == "auto" else self.device
