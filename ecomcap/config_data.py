"""Settings of the data half of a run: where data comes from (synthetic or a directory), how it is
ingested and cleaned, the brand filter, and SFT's image augmentation (re-exported by
`ecomcap.config`, where every other concern's settings live)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ecomcap.config_base import _Strict


class CleanConfig(_Strict):
    """Caption cleaning rules; each acts per reference and is counted in the ingest report."""

    normalize: bool = Field(True, description="strip spaces/special tokens, full-width ASCII -> ASCII")
    drop_looping: bool = Field(True, description="drop references with looping repetition")
    looping_max_repeat_share: float = Field(
        0.5, ge=0, le=1, description="drop when this share of 3-grams are repeats"
    )
    drop_garbled: bool = Field(True, description="drop references with replacement chars/mojibake")
    garbled_max_share: float = Field(0.1, ge=0, le=1)
    cut_truncated: bool = Field(
        True, description="cut a reference truncated mid-sentence back to its last sentence end"
    )
    require_style: bool = Field(False, description="keep only references that state a …风格 style")
    max_caption_tokens: int = Field(200, ge=1, description="references longer than this are dropped")


class BrandBalanceConfig(_Strict):
    """A class-balance filter on brands (train split only: the evaluation set stays whole). An
    image's brand is the lexicon brand most of its references name; images of brands with fewer
    than `min_images` are quarantined as `rare_brand` (a brand seen 3 times teaches the model to
    name it on the wrong products more than to recognise it), counted in the ingest report."""

    min_images: int = Field(0, ge=0, description="quarantine train images of brands with fewer images (0: off)")
    brands: list[str] = Field(default_factory=list, description="the brand lexicon (default for the synthetic "
                              "set: its brands); other data must list its brands")


class IngestConfig(_Strict):
    """Streaming ingest of one split: per-row checks, quarantine, Parquet shards."""

    max_bad_rate: float = Field(0.05, ge=0, le=1, description="fail when bad rows/rows_in exceeds it (the brand filter's drops are not bad rows)")
    min_side: int = Field(16, ge=1, description="images with a side under this are quarantined")
    max_pixels: int = Field(50_000_000, ge=1, description="decompression-bomb guard (width*height)")
    max_aspect_ratio: float = Field(200.0, ge=1, description="longer/shorter side; Qwen2-VL refuses > 200")
    rows_per_shard: int = Field(20_000, ge=1)
    rows_per_group: int = Field(1_000, ge=1, description="Parquet row group size (memory bound)")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    brand_balance: BrandBalanceConfig = Field(default_factory=BrandBalanceConfig)


class SynthConfig(_Strict):
    """The bundled synthetic MUGE-format set (default data and learning benchmark)."""

    train: int = Field(2000, ge=0)
    valid: int = Field(200, ge=0)
    test: int = Field(100, ge=0)
    seed: int = 0
    image_size: int = Field(112, ge=16)
    corrupt_rate: float = Field(0.0, ge=0, le=1)
    brand_rate: float = Field(0.35, ge=0, le=1)
    difficulty: Literal["easy", "hard"] = Field(
        "easy", description="easy: one centred silhouette on a plain ground, template references (make run's "
        "default: learns on CPU in minutes); hard: photo-like scenes, 30 long-tailed brands, a reference grammar")
    shift: bool = Field(False, description="hard only: train images centred at one scale on a plain ground, "
                        "valid/test with the full variation (measures robustness, e.g. what augmentation buys)")

    @model_validator(mode="after")
    def _shift_needs_hard(self):
        if self.shift and self.difficulty != "hard":
            raise ValueError("synth.shift needs synth.difficulty: hard (the easy set has one layout)")
        return self


class DataConfig(_Strict):
    """Where the data comes from: the synthetic generator or a directory of MUGE/ad files."""

    source: Literal["synthetic", "dir"] = "synthetic"
    src_dir: Path | None = None
    manifest: Path | None = Field(
        None, description="committed file describing remote data (its hash is the data fingerprint)"
    )
    work_dir: Path = Path(".run/data")
    splits: list[Literal["train", "valid", "test"]] = ["train", "valid"]
    dev_images: int = Field(
        200, ge=0, description="images split off train (by id hash) to pick the best checkpoint; "
        "the gate scores on valid, which training never saw. 0: pick on valid (optimistic gate)")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)


class AugmentConfig(_Strict):
    """SFT image augmentation (`sft.augment`): off unless `enabled`; each op has its strength."""

    enabled: bool = False
    seed: int = 0
    rotate_deg: float = Field(10.0, ge=0, le=45, description="max |rotation| in degrees (0: off)")
    translate: float = Field(0.1, ge=0, le=0.4, description="max shift as a share of each side (0: off)")
    scale: float = Field(0.15, ge=0, le=0.5, description="max zoom in or out, share (0: off)")
    crop_min_area: float = Field(0.7, gt=0, le=1, description="random resized crop: least area kept (1: off)")
    brightness: float = Field(0.3, ge=0, le=1, description="colour jitter: factor in 1 +- this (0: off)")
    contrast: float = Field(0.3, ge=0, le=1)
    saturation: float = Field(0.3, ge=0, le=1)
    hue: float = Field(0.0, ge=0, le=0.5, description="off by default: a hue shift changes the colour the "
                       "reference names (红色 -> 橙色); the caption would then be taught a wrong colour")
    hflip: bool = Field(False, description="off by default: mirrors brand words (synthetic and real) and logos")
