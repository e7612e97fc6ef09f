"""Settings of the image–text encoders both jobs use: the retrieval job's dual encoder and the
captioning job's grounding scorer/evaluator, plus how captions are rewarded and reranked with
them. One pydantic model per concern, as in `ecomcap.config` (which builds on this module)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ecomcap.config_base import LoopConfig, _Strict

Arch = Literal["chinese_clip", "clip", "siglip"]
ItemEmbedding = Literal["image", "text", "fused"]
MAX_UNKNOWN_SHARE = 0.3  # an English-only vocabulary maps ~95% of the sample queries' characters to unknown


class TinyEncoderConfig(_Strict):
    """A random-init dual encoder of the real class, built locally (CPU runs, tests)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    image_size: int = 64
    patch_size: int = 16
    seed: int = 0


class EncoderConfig(_Strict):
    """Which dual encoder: transformers class by `arch`, weights from a hub id or local path."""

    arch: Arch = "chinese_clip"
    name_or_path: str = "OFA-Sys/chinese-clip-vit-base-patch16"
    tiny: TinyEncoderConfig | None = Field(None, description="build a tiny model at name_or_path when missing")
    trust_remote_code: bool = False
    max_text_len: int = Field(52, ge=4, description="Chinese-CLIP uses 52, SigLIP 64")
    max_unknown_share: float = Field(
        MAX_UNKNOWN_SHARE, ge=0, le=1, description="refuse a pretrained tokenizer that maps more than this share "
        "of the characters of sample Chinese product queries to its unknown id (an English-only vocabulary); 1: off")
    item_embedding: ItemEmbedding = "image"
    fusion_weight: float = Field(0.5, ge=0, le=1, description="image share of a fused item embedding")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where galleries are embedded and models evaluated/re-scored (auto: cuda when "
        "present); training runs on the accelerator's device")

    def torch_device(self) -> str | None:
        """None for auto (load_encoder then picks cuda when present)."""
        return None if self.device == "auto" else self.device


class HardNegativeConfig(_Strict):
    """FlagEmbedding-style mining with the current model: sample from a rank window."""

    enabled: bool = False
    start_step: int = Field(150, ge=0, description="mine at this step, then train with the negatives")
    rank_window: tuple[int, int] = (10, 210)
    per_query: int = Field(15, ge=1)
    per_example: int = Field(1, ge=0, description="negatives added to the batch per training pair")


class GroundingTrainConfig(LoopConfig):
    """How the grounding scorer and evaluator are trained: the retrieval job's loop and losses on
    (image, reference) pairs of the caption train split, with attribute-swapped references as
    each image's own hard negatives. `seed` is the scorer's (the evaluator takes `evaluator_seed`,
    and a `tiny` encoder is initialised with the role's seed); `output_dir` and `resume` are set by
    the grounding stage (its own output; a cached step is not retrained)."""

    output_dir: Path | None = Field(None, description="unused: each role trains inside the grounding stage's output")
    max_steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    eval_every: int = Field(0, ge=0, description="0: no in-training validation (the probe runs at the end)")
    save_every: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    loss: Literal["infonce", "sigmoid"] = "infonce"
    text_negatives: int = Field(4, ge=0, description="attribute-swapped references per pair (0: plain CLIP)")
    hard_negatives: HardNegativeConfig = Field(
        default_factory=HardNegativeConfig, description="images mined with the model being trained: once it "
        "tells colours apart, its near misses differ in what it does not yet see (shape, pattern)")


class GroundingConfig(_Strict):
    """Captions that see: an image–text scorer trained on the caption train split only (SCST
    reward, reranking) and an independently trained evaluator that no stage optimises against
    (evaluation only). Each is probed on valid images: the right reference must outscore the
    same reference with one attribute swapped; a reward term is used only for attributes whose
    probe accuracy reaches `min_pairwise_acc`."""

    enabled: bool = False
    encoder: EncoderConfig = Field(default_factory=lambda: EncoderConfig(item_embedding="image"),
                                   description="the encoder both roles start from (a `tiny` one is built per role "
                                   "with the role's seed inside the stage's output)")
    train: GroundingTrainConfig = Field(default_factory=GroundingTrainConfig)
    evaluator_seed: int = Field(1, description="the evaluator's training (and tiny init) seed; must differ")
    evaluator_loss: Literal["same", "infonce", "sigmoid"] = Field(
        "same", description="the evaluator's loss (another loss makes it more independent)")
    attribute_vocab: dict[str, list[str]] | None = Field(
        None, description="field -> attribute words for the swapped negatives, the probe and the reward's "
        "blinding of untrusted attributes; none: the synthetic set's")
    min_pairwise_acc: float = Field(0.9, ge=0, le=1, description="probe accuracy an attribute needs for the reward")
    clip_w: float = Field(2.5, gt=0, description="CLIP-S = w * max(cos, 0) (Hessel et al. 2021)")
    probe_images: int = Field(600, ge=1, description="valid images probed per attribute")

    @model_validator(mode="after")
    def _independent_evaluator(self) -> "GroundingConfig":
        """Refused when the config loads, not after the scorer has trained."""
        if self.evaluator_seed == self.train.seed:
            raise ValueError("grounding.evaluator_seed must differ from grounding.train.seed: the evaluator has to be "
                             "trained independently of the scorer")
        return self


class RewardConfig(_Strict):
    """SCST reward = cider·CIDEr-D + clip·CLIP-S + distinct·distinctiveness - repeat·(repeated
    3-gram share); one baseline over the sum. 0 turns a term off (and skips its cost)."""

    cider: float = Field(1.0, ge=0)
    clip: float = Field(0.0, ge=0, description="λ_clip: CLIP-S of (image, sample) by the grounding scorer")
    distinct: float = Field(0.0, ge=0, description="λ_dist: log-softmax of the sample's similarity to its own "
                            "image among the batch's images (a caption that fits every product scores low)")
    repeat: float = Field(0.0, ge=0, description="penalty on the share of repeated 3-grams (reward hacking guard)")

    @property
    def needs_scorer(self) -> bool:
        return self.clip > 0 or self.distinct > 0


class RerankConfig(_Strict):
    """Generation-time reranking: N beams rescored by length-normalised log-prob + weight·CLIP-S."""

    candidates: int = Field(0, ge=0, description="beams kept and rescored per image; 0: off")
    weight: float = Field(1.0, ge=0, description="μ: weight of the grounding scorer's CLIP-S")
    scorer_dir: str | None = Field(
        None, description="the grounding scorer; the training pipeline sets it from its grounding step, and an "
        "exported model ships a copy (grounding_scorer/, relative to the model directory)")
