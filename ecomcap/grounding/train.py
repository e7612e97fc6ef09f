"""Train the grounding scorer and the independent evaluator on the caption train split.

The caption train split already has the retrieval job's item layout (image shards with their
references), so the encoders train with the retrieval library's own loop, losses and model
classes: items = train images (linked, never copied), queries = their references, plus each
reference with one attribute swapped as that image's own hard negative text. Valid and test
images are never seen (checked on ids); valid images only feed the probe afterwards.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ecomcap.config_encoders import GroundingConfig
from ecomcap.errors import EcomcapError
from ecomcap.grounding.probe import probe
from ecomcap.grounding.scorer import QUALITY_FILE, GroundingScorer, weights_fingerprint
from ecomcap.retrieval.data.batches import TrainingSet
from ecomcap.retrieval.data.ingest import QUERY_SCHEMA
from ecomcap.retrieval.data.swaps import AttributeSwapper, synthetic_vocab
from ecomcap.training.data import ShardImages

log = logging.getLogger(__name__)
ROLES = ("scorer", "evaluator")


def caption_pairs_split(train_dir: str | Path, out: str | Path) -> Path:
    """A retrieval-layout split over the caption train split: `items` links to it, one query per
    reference (`<image_id>#<k>`, its one positive the image)."""
    out, train_dir = Path(out), Path(train_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    items = out / "items"
    if items.is_symlink() or items.exists():
        items.unlink()
    items.symlink_to(train_dir, target_is_directory=True)
    data = ShardImages(train_dir)
    rows = [{"query_id": f"{i}#{k}", "query_text": t, "item_ids": [i]}
            for i, texts in zip(data.ids, data.texts) for k, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(rows, schema=QUERY_SCHEMA), out / "queries.parquet")
    return out


def ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def check_unseen(train_dir: str | Path, held_out: dict[str, "str | Path | set[str] | None"]) -> None:
    """No image of a held-out split (valid/test: an ingested directory or a set of ids) may be
    among the encoder's training images."""
    seen = set(ShardImages(train_dir).ids)
    for split, other in held_out.items():
        if other is None:
            continue
        shared = seen & (other if isinstance(other, set) else set(ShardImages(other).ids))
        if shared:
            raise EcomcapError(f"grounding encoders train on the caption train split only, but {len(shared)} of "
                               f"its image ids are also in {split}, e.g. {sorted(shared)[:3]}: de-duplicate the splits")


def role_config(cfg: GroundingConfig, role: str, out_root: Path):
    """The retrieval run config that trains one role (the evaluator: its own seed, maybe its own loss)."""
    from ecomcap.retrieval.config import RetrievalRunConfig, RetrievalTrainConfig

    seed = cfg.train.seed if role == "scorer" else cfg.evaluator_seed
    enc = cfg.encoder.model_copy(update={"item_embedding": "image"})
    if enc.tiny is not None:  # a from-scratch model: its own initialisation per role
        enc = enc.model_copy(update={"name_or_path": str(out_root / f"base-{role}"),
                                     "tiny": enc.tiny.model_copy(update={"seed": seed})})
    loss = cfg.train.loss if role == "scorer" or cfg.evaluator_loss == "same" else cfg.evaluator_loss
    train = RetrievalTrainConfig(**{**cfg.train.model_dump(exclude={"loss", "text_negatives"}),
                                    "seed": seed, "loss": loss, "text_negatives": cfg.train.text_negatives,
                                    "attribute_vocab": cfg.attribute_vocab, "resume": False,
                                    "output_dir": out_root / f"train-{role}"})
    return RetrievalRunConfig(encoder=enc, train=train)


class RoleMetrics:
    """Per-step metrics of one role under its own names (`grounding_scorer/loss`, ...): both roles
    train with the retrieval loop, whose names would otherwise collide in one MLflow run."""

    def __init__(self, inner, role: str):
        self.inner, self.prefix = inner, f"grounding_{role}/"

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.inner({self.prefix + k.split("/", 1)[-1]: v for k, v in metrics.items()}, step)

    def flush(self, final: bool = False) -> None:
        flush = getattr(self.inner, "flush", None)
        if flush is not None:
            flush(final=final)


def train_role(pairs_dir: Path, cfg: GroundingConfig, role: str, out_root: Path, on_metrics=None) -> Path:
    from ecomcap.retrieval.train.loop import train_retriever

    metrics = RoleMetrics(on_metrics, role) if on_metrics is not None else None
    res = train_retriever(pairs_dir, None, role_config(cfg, role, out_root), metrics)
    return Path(res.model_dir)


def build_grounding(train_dir: str | Path, valid_dir: str | Path | None, cfg: GroundingConfig, out: str | Path,
                    test_dir: "str | Path | set[str] | None" = None, attributes: dict | None = None,
                    on_metrics=None) -> dict[str, Any]:
    """Train, probe and record the scorer and the evaluator under `out/{scorer,evaluator}`."""
    out = Path(out)
    check_unseen(train_dir, {"valid": valid_dir, "test": test_dir})
    pairs = caption_pairs_split(train_dir, out / "pairs")
    swapper = AttributeSwapper(cfg.attribute_vocab or synthetic_vocab())
    train_fp = json.loads((Path(train_dir) / "report.json").read_text(encoding="utf-8"))["fingerprint"]
    summary: dict[str, Any] = {}
    for role in ROLES:
        model_dir = train_role(pairs, cfg, role, out, on_metrics)
        scorer = GroundingScorer(model_dir, device=cfg.encoder.torch_device(), w=cfg.clip_w)
        trained = TrainingSet(pairs).items.ids  # the images this encoder was trained on
        quality = {"role": role, "fingerprint": weights_fingerprint(model_dir),
                   "trained_on": {"fingerprint": train_fp, "images": len(trained), "ids_sha256": ids_digest(trained)},
                   "probe": probe(scorer, valid_dir, swapper, cfg.probe_images, attributes) if valid_dir else {},
                   "min_pairwise_acc": cfg.min_pairwise_acc, "clip_w": cfg.clip_w, "vocab": swapper.vocab}
        if not quality["probe"]:
            log.warning("grounding %s: no valid reference names a word of the attribute vocabulary, so nothing was "
                        "probed and every attribute counts as trusted: set grounding.attribute_vocab for this "
                        "data", role)
        (Path(model_dir) / QUALITY_FILE).write_text(json.dumps(quality, ensure_ascii=False, indent=2), encoding="utf-8")
        final = out / role
        if final.exists():
            import shutil

            shutil.rmtree(final)
        Path(model_dir).rename(final)
        summary[role] = {**quality, "dir": str(final)}
        for field, v in quality["probe"].items():
            verdict = "used" if v["accuracy"] >= cfg.min_pairwise_acc else \
                f"below {cfg.min_pairwise_acc:.0%}: not trusted for this attribute"
            log.info("grounding %s probe %s: %.1f%% of %d pairs (%s)", role, field, 100 * v["accuracy"], v["n"],
                     verdict if role == "scorer" else "evaluator")
    return summary
