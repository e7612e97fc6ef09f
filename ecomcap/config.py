"""Pydantic settings, one model per concern, shared by the CLI, the ZenML steps and the YAML configs.

Unknown keys are errors (a typo in a YAML file must not be silently ignored).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ecomcap.errors import EcomcapError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class IngestConfig(_Strict):
    """Streaming ingest of one split: per-row checks, quarantine, Parquet shards."""

    max_bad_rate: float = Field(0.05, ge=0, le=1, description="fail when quarantined/rows_in exceeds it")
    min_side: int = Field(16, ge=1, description="images with a side under this are quarantined")
    max_pixels: int = Field(50_000_000, ge=1, description="decompression-bomb guard (width*height)")
    rows_per_shard: int = Field(20_000, ge=1)
    rows_per_group: int = Field(1_000, ge=1, description="Parquet row group size (memory bound)")
    clean: CleanConfig = Field(default_factory=CleanConfig)


class SynthConfig(_Strict):
    """The bundled synthetic MUGE-format set (default data and learning benchmark)."""

    train: int = Field(2000, ge=0)
    valid: int = Field(200, ge=0)
    test: int = Field(100, ge=0)
    seed: int = 0
    image_size: int = Field(112, ge=16)
    corrupt_rate: float = Field(0.0, ge=0, le=1)
    brand_rate: float = Field(0.35, ge=0, le=1)


class DataConfig(_Strict):
    """Where the data comes from: the synthetic generator or a directory of MUGE/ad files."""

    source: Literal["synthetic", "dir"] = "synthetic"
    src_dir: Path | None = None
    work_dir: Path = Path(".run/data")
    splits: list[Literal["train", "valid", "test"]] = ["train", "valid"]
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error when the file is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise EcomcapError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EcomcapError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise EcomcapError(f"{path} must hold a mapping at the top level")
    return data


def parse_model(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate `data` into `model`; pydantic errors become one readable EcomcapError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise EcomcapError(f"invalid config in {where}: {problems}") from None
