"""Retrieval settings, one pydantic model per concern (CLI, ZenML steps and YAML share them)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ecomcap.config import IngestConfig, LaunchConfig, LoopConfig, RegistryConfig, _Strict
from ecomcap.config_encoders import (  # noqa: F401  (re-exported)
    Arch,
    EncoderConfig,
    HardNegativeConfig,
    ItemEmbedding,
    TinyEncoderConfig,
)
from ecomcap.retrieval.index.base import IndexConfig


def retriever_registry(**update) -> RegistryConfig:
    """The retriever's registry and gate defaults (the retrieval pipeline's and the index job's)."""
    return RegistryConfig(**{"model_name": "ecomcap-retriever", "experiment": "retrieval_pipeline",
                             "primary_metric": "MeanRecall", "guard_metrics": ["R1"], "tolerance": 1.0,
                             "floor": 5.0, **update})


class RetrievalSynthConfig(_Strict):
    """Synthetic retrieval set: attribute-combination queries over a drawn product gallery."""

    train_products: int = Field(600, ge=1, description="base products drawn for the train gallery")
    valid_products: int = Field(300, ge=1)
    train_max_positives: int = Field(30, ge=1, description="train queries keep up to this many positives")
    distractors: int = Field(1, ge=0, description="one-attribute variants per base product")
    max_views: int = Field(3, ge=1, description="drawings of one product (scale/crop/background/JPEG)")
    image_size: int = Field(112, ge=16)
    brand_rate: float = Field(0.35, ge=0, le=1)
    seed: int = 0


class RetrievalDataConfig(_Strict):
    """Where retrieval data comes from; ingest settings are the captioning ones (same rules)."""

    source: Literal["synthetic", "muge", "seed002", "shopee"] = "synthetic"
    src_dir: Path | None = Field(None, description="directory of the raw files (not synthetic)")
    manifest: Path | None = Field(
        None, description="committed file describing remote data (its hash is the data fingerprint)"
    )
    work_dir: Path = Path(".run/retrieval/data")
    splits: list[Literal["train", "valid", "test"]] = ["train", "valid"]
    synth: RetrievalSynthConfig = Field(default_factory=RetrievalSynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)


class RetrievalTrainConfig(LoopConfig):
    """Contrastive fine-tuning; the loop (accelerate, checkpoints, resume) is the captioning one."""

    output_dir: Path = Path(".run/retrieval/train")
    max_steps: int = Field(300, ge=0)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    eval_every: int = Field(100, ge=0)
    eval_images: int = Field(1000, ge=1, description="unused here: the full valid gallery is ranked")
    save_every: int = Field(0, ge=0)
    loss: Literal["infonce", "sigmoid"] = "infonce"
    logit_init: Literal["auto", "model", "siglip"] = Field(
        "auto", description="auto: SigLIP's t'=log 10, b=-10 for the sigmoid loss on a from-scratch model"
    )
    match_weight: float = Field(0.0, ge=0, description="weight of the same-product term (views of one product "
                                "group as positives, Shopee-style); 0: off")
    grad_cache_chunk: int | None = Field(None, ge=1, description="embed in chunks of this size (gradient caching)")
    pixel_cache_items: int = Field(4096, ge=0, description="preprocessed item images kept in memory")
    strategy: Literal["full", "lora"] = "full"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "query", "key", "value"]
    hard_negatives: HardNegativeConfig = Field(default_factory=HardNegativeConfig)
    text_negatives: int = Field(0, ge=0, description="attribute-swapped copies of each query text, negatives of "
                                "its own item only (NegCLIP-style compositional negatives); 0: off")
    attribute_vocab: dict[str, list[str]] | None = Field(
        None, description="field -> attribute words swapped for text_negatives; none: the synthetic set's "
        "category/colour/pattern/brand words")


class RetrievalEvalConfig(_Strict):
    chunk: int = Field(1024, ge=1, description="queries per similarity block")
    match_thresholds: list[float] = Field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(19)] + [round(0.9 + 0.01 * i, 2) for i in range(10)]
        + [0.995, 0.999, 0.9999, 1.0], description="cosine thresholds tried on the train groups")
    match_at_least_two: bool = False
    figure_queries: int = Field(6, ge=0, description="queries drawn with their top-5 images")


class RetrievalRunConfig(_Strict):
    """A whole retrieval run (configs/retrieval_*.yaml: parameters.config has this shape)."""

    data: RetrievalDataConfig = Field(default_factory=RetrievalDataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    train: RetrievalTrainConfig = Field(default_factory=RetrievalTrainConfig)
    eval: RetrievalEvalConfig = Field(default_factory=RetrievalEvalConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)  # the same launcher: N processes are DDP
    index: IndexConfig = Field(default_factory=IndexConfig, description="how the gallery is searched: by the "
                               "evaluation, the gate, the registered model, `ecomcap search` and the page alike")
    registry: RegistryConfig = Field(default_factory=lambda: retriever_registry(minimums={"index_recall10": 0.98}))

    @model_validator(mode="after")
    def _recall_minimum(self) -> "RetrievalRunConfig":
        """index.min_recall is the gate's minimum of the served index's recall (one setting, not two)."""
        given = self.registry.minimums.get("index_recall10")
        by_user = "registry" in self.model_fields_set and "minimums" in self.registry.model_fields_set
        user_min = given is not None and by_user
        user_idx = "index" in self.model_fields_set and "min_recall" in self.index.model_fields_set
        if user_min and user_idx and given != self.index.min_recall:
            raise ValueError(f"registry.minimums.index_recall10 ({given}) and index.min_recall "
                             f"({self.index.min_recall}) disagree: set index.min_recall only")
        if user_min and not user_idx:
            self.index = self.index.model_copy(update={"min_recall": given})
        self.registry.minimums = {**self.registry.minimums, "index_recall10": self.index.min_recall}
        return self

    @model_validator(mode="after")
    def _needs_queries(self) -> "RetrievalRunConfig":
        """Shopee ships titles and product groups but no search queries: its ingest serves
        same-product matching (library), not this pipeline's query -> item training and Recall@K."""
        if self.data.source == "shopee":
            raise ValueError("data.source 'shopee' has no search queries, which the retrieval pipeline trains "
                             "and evaluates on; use source muge, seed002 or synthetic (Shopee ingest serves "
                             "product matching through ecomcap.retrieval.data.ingest.ingest_retrieval_split)")
        return self

    @model_validator(mode="after")
    def _ddp_only(self) -> "RetrievalRunConfig":
        """Several processes train under DDP with gathered embeddings (ecomcap/retrieval/train/
        distributed.py); DeepSpeed/FSDP engines would be bypassed by the towers. Refused here, not
        after N ranks have loaded their towers (a missing file is the launcher's to report)."""
        path = Path(self.launch.config_file) if self.launch.config_file else None
        if path is not None and path.is_file():
            import yaml

            found = yaml.safe_load(path.read_text(encoding="utf-8"))
            kind = str(found.get("distributed_type", "")) if isinstance(found, dict) else ""
            if kind.upper() in ("DEEPSPEED", "FSDP"):
                raise ValueError(f"launch.config_file {path} selects {kind}; retrieval training runs on one process "
                                 "or DDP: unset launch.config_file (launch.num_processes alone gives DDP)")
        return self

