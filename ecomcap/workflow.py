"""The pipeline's stages as plain functions: what each ZenML step calls (steps stay thin).

Each stage takes the one run config, does its work through the library, logs to the active
MLflow run when there is one (the ZenML MLflow tracker opens it), and returns paths or plain
data for the step to wrap as typed artifacts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ecomcap.config import DataConfig, GroundingConfig, RunConfig
from ecomcap.data.fingerprint import source_fingerprint  # noqa: F401  (re-exported: one function for both jobs)
from ecomcap.registry import tracking

log = logging.getLogger(__name__)


def library_fingerprint() -> str:
    """Hash of the `ecomcap` sources: part of every step's cache key (ZenML hashes only the step
    function's own code), so a change in the library reruns the steps it may affect."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def scratch_dir(work_dir: str | Path, what: str) -> Path:
    """A fresh folder for one stage's output, next to the data (both jobs' stages use it)."""
    root = Path(work_dir).parent / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{what}-", dir=root))


def _scratch(cfg: RunConfig, what: str) -> Path:
    return scratch_dir(cfg.data.work_dir, what)


def ingest_stage(data: DataConfig, split: str) -> Path:
    """Synthesize when configured, then stream one split into shards + quarantine."""
    from ecomcap.data.ingest import ingest_split
    from ecomcap.data.prepare import ingest_config, source_dir

    out = scratch_dir(data.work_dir, f"ingest-{split}")
    return ingest_split(source_dir(data), split, out, ingest_config(data)).out_dir


def validate_stage(splits: dict[str, Path], cfg: RunConfig) -> dict[str, Any]:
    """GX suite + bad-row gate per split; raises EcomcapError with the reason when a split fails."""
    from ecomcap.data.validate import enforce, validate_dataset

    reports = {s: validate_dataset(d, cfg.data.ingest, write=False) for s, d in splits.items()}
    tracking.log_config("data", cfg.data)
    for split, rep in reports.items():
        tracking.log_text(json.dumps({k: v for k, v in rep.items() if k != "gx_result"}, ensure_ascii=False,
                                     indent=2, default=str), f"data_validation/{split}_report.json")
        tracking.log_text(json.dumps(rep.get("gx_result"), indent=2, default=str), f"data_validation/{split}_gx.json")
        tracking.log_metrics({"rows_in": rep["rows_in"], "rows_ok": rep["rows_ok"],
                              "rows_quarantined": rep["rows_quarantined"]}, prefix=f"data.{split}.")
    fps = {s: r["fingerprint"] for s, r in reports.items()}
    tracking.set_tags({"data_fingerprint": data_fingerprint(fps), "eval_fingerprint": fps.get("valid", ""),
                       "source_fingerprint": source_fingerprint(cfg.data), "config_hash": tracking.config_hash(cfg),
                       "code_version": tracking.code_version()})
    record_datasets("captions", reports, splits)
    for rep in reports.values():
        enforce(rep)
    return {s: {k: v for k, v in r.items() if k != "gx_result"} for s, r in reports.items()}


SPLIT_CONTEXT = {"train": "training", "valid": "validation", "test": "test"}


def record_datasets(job: str, reports: dict[str, dict], paths: dict[str, Path]) -> None:
    """Each split as an MLflow dataset input ("<job>-<split>", digest = its fingerprint, source =
    its directory), so runs show and compare which data they saw."""
    for split, rep in reports.items():
        tracking.log_dataset(f"{job}-{split}", rep["fingerprint"], paths[split], SPLIT_CONTEXT.get(split, split),
                             tags={"rows_ok": rep["rows_ok"], "rows_quarantined": rep["rows_quarantined"]})


def data_fingerprint(fingerprints: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]


def grounding_stage(train: Path, valid: Path, cfg: GroundingConfig, data: DataConfig) -> Path:
    """Train the grounding scorer and the independent evaluator on the train split (never on a
    valid or test image: checked on ids); logs each one's probe accuracy per attribute and its
    fingerprint (the runs using them record it too). Takes only its own settings and the data's,
    so a change elsewhere in the run config reuses the cached encoders."""
    from ecomcap.grounding.train import build_grounding

    tracking.log_config("grounding", cfg)
    out = scratch_dir(data.work_dir, "grounding")
    summary = build_grounding(train, valid, cfg, out, test_dir=_raw_test_ids(data),
                              attributes=_synthetic_attributes(data), on_metrics=tracking.metrics_callback())
    record_grounding(out)
    tracking.log_text(json.dumps(summary, ensure_ascii=False, indent=2), "grounding/summary.json")
    return out


def record_grounding(grounding: Path) -> None:
    """The encoders a run used, from their own records (the grounding step may have come from the
    cache and logged nothing in this run): fingerprints as tags, probe accuracies as metrics."""
    for role in ("scorer", "evaluator"):
        path = grounding / role / "grounding.json"
        if path.is_file():
            info = json.loads(path.read_text(encoding="utf-8"))
            tracking.set_tags({f"grounding.{role}": info["fingerprint"]})
            tracking.log_metrics({f: v["accuracy"] for f, v in info.get("probe", {}).items()},
                                 prefix=f"grounding.{role}.probe.")


def _raw_test_ids(data: DataConfig) -> set[str] | None:
    """The test split's image ids from its raw TSV (the training pipeline does not ingest it)."""
    from ecomcap.data.prepare import source_dir

    path = Path(source_dir(data)) / "IC_test.tsv"
    if "test" not in data.splits or not path.is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        return {line.split("\t", 1)[0].strip().lstrip("\ufeff") for line in fh if "\t" in line}


def with_grounding(cfg: RunConfig, grounding: Path | None) -> RunConfig:
    """`cfg` with the reranker pointed at the grounding stage's scorer (when reranking is on)."""
    from ecomcap.inference.rerank import with_grounding_scorer

    return cfg.model_copy(update={"generate": with_grounding_scorer(cfg.generate, grounding)})


def generate_stage(model_dir: Path, data_dir: Path, cfg: RunConfig, log: bool = True,
                   grounding: Path | None = None, registered: bool = False) -> dict[str, str]:
    """Captions for every image of `data_dir`; logs caption_gen.jsonl (unless `log` is off).
    `registered`: `model_dir` is a registered version (batch inference), captioned with its recorded
    settings, as it is served."""
    from ecomcap.inference.batch import caption_dataset

    cfg = _as_registered(cfg, model_dir) if registered else with_grounding(cfg, grounding)

    if log:
        tracking.log_config("generate", cfg.generate)
    out = _scratch(cfg, "generate") / "caption_gen.jsonl"
    preds = caption_dataset(model_dir, cfg.model, data_dir, out, cfg.generate, parts_root(cfg), cleanup=True)
    if log:
        tracking.log_artifact(out)
    return preds


def _as_registered(cfg: RunConfig, model_dir: Path) -> RunConfig:
    from ecomcap.registry.pyfunc import as_recorded

    return as_recorded(cfg, model_dir)


def generate_share_stage(model_dir: Path, data_dir: Path, cfg: RunConfig, index: int, count: int | None = None) -> int:
    """One share of a generate fan-out (a step, or a pod of `generate_pods`): chunks index,
    index+count, ... -> parts."""
    from ecomcap.inference.batch import caption_share

    cfg = _as_registered(cfg, model_dir)  # a fan-out captions the registry's champion
    return caption_share(model_dir, cfg.model, data_dir, cfg.generate, index, count or cfg.generate.chunks.fan_out,
                         parts_root(cfg))


def merge_generated_stage(model_dir: Path, data_dir: Path, cfg: RunConfig) -> dict[str, str]:
    """After a fan-out: every share's parts -> caption_gen.jsonl (every id once), logged."""
    from ecomcap.inference.batch import merge_dataset

    cfg = _as_registered(cfg, model_dir)  # the parts are keyed by the settings the shares used
    tracking.log_config("generate", cfg.generate)
    out = _scratch(cfg, "generate") / "caption_gen.jsonl"
    preds = merge_dataset(model_dir, cfg.model, data_dir, out, cfg.generate, parts_root(cfg), cleanup=True)
    tracking.log_artifact(out)
    return preds


def parts_root(cfg: RunConfig) -> Path:
    """Finished generate chunks, kept until their run's merge (keyed by data, model and decoding)."""
    return Path(cfg.generate.chunks.parts_dir or Path(cfg.data.work_dir).parent / "generate_parts")


def evaluate_stage(preds: dict[str, str], valid: Path, cfg: RunConfig,
                   curves: dict[str, Path] | None = None, log: bool = True,
                   grounding: Path | None = None) -> tuple[dict[str, Any], str, str]:
    """(metrics, eval fingerprint, samples HTML); logs metrics, samples.html, loss curves
    (`log` off: scoring another model, e.g. re-evaluating the champion, must not overwrite them).
    `grounding`: the grounding stage's output, whose evaluator adds caption->image R@1/R@5 and CLIP-S."""
    from ecomcap.data.prepare import brand_lexicon
    from ecomcap.data.shards import read_references, read_report
    from ecomcap.metrics.report import caption_report
    from ecomcap.reports import loss_curves_png, samples_html

    refs = read_references(valid)
    attrs = _synthetic_attributes(cfg.data)
    lexicon = brand_lexicon(cfg.data)
    metrics = caption_report(preds, refs, attrs, _train_brand_counts(cfg.data), lexicon)
    evaluator = grounding_evaluator(cfg, grounding)
    if evaluator is not None:
        from ecomcap.grounding.evaluate import grounded_metrics

        metrics.update(grounded_metrics(preds, valid, evaluator))
        metrics["evaluator"] = evaluator.fingerprint
    eval_fp = read_report(valid)["fingerprint"]
    if evaluator is not None and "cap2img_R1" in cfg.registry.guard_metrics:
        eval_fp = f"{eval_fp}+{evaluator.fingerprint}"  # R@1 of another evaluator is not comparable
    html = samples_html(_samples(valid, preds, refs, cfg.registry.samples_in_report, attrs), metrics)
    if not log:
        return metrics, eval_fp, html
    tracking.log_metrics({k: metrics[k] for k in tracking.HEADLINE})  # top of the MLflow tables
    tracking.log_metrics({k: v for k, v in metrics.items() if k in VAL_FIGURES}, prefix="val.")
    if grounding is not None:
        record_grounding(Path(grounding))
    if "attributes" in metrics:
        tracking.log_metrics(metrics["attributes"], prefix="val.attr.")
    if "brands" in metrics:
        brands = metrics["brands"]
        tracking.log_metrics({k: v for k, v in brands.items() if k != "per_brand" and v is not None},
                             prefix="val.brand.")
        tracking.log_text(json.dumps(brands, ensure_ascii=False, indent=2), "brand_accuracy.json")
    tracking.log_text(html, "samples.html")
    if curves:
        png = loss_curves_png(curves, _scratch(cfg, "curves") / "loss_curves.png")
        if png:
            tracking.log_artifact(png)
    return metrics, eval_fp, html


VAL_FIGURES = ("distinct", "repeat_ngram", "mean_len", "top_opener_share", "cap2img_R1", "cap2img_R5", "clip_s_eval")


def grounding_evaluator(cfg: RunConfig, grounding: Path | None):
    """The independent evaluator encoder of a grounding stage output (None when there is none)."""
    if grounding is None or not (Path(grounding) / "evaluator").is_dir():
        return None
    from ecomcap.grounding.scorer import GroundingScorer

    return GroundingScorer(Path(grounding) / "evaluator", device=cfg.grounding.encoder.torch_device(),
                           w=cfg.grounding.clip_w)


def _train_brand_counts(data: DataConfig) -> dict[str, int] | None:
    """Training images per brand (what makes a brand frequent or rare) from the synthetic set's
    labels (before ingest's brand filter); None for other data: frequent/rare then follow the
    evaluation set's own counts."""
    from ecomcap.metrics.attributes import synthetic_attributes
    from ecomcap.metrics.brands import brand_counts

    train = synthetic_attributes(data.work_dir, data.source, "train")
    return dict(brand_counts(train)) if train else None


def _synthetic_attributes(data: DataConfig) -> dict | None:
    from ecomcap.metrics.attributes import synthetic_attributes

    return synthetic_attributes(data.work_dir, data.source, "valid")


def _samples(valid: Path, preds: dict[str, str], refs: dict[str, list[str]], n: int,
             attrs: dict | None = None) -> list[dict]:
    from ecomcap.data.shards import iter_batches
    from ecomcap.metrics.attributes import attribute_checks

    out: list[dict] = []
    for rb in iter_batches(valid, ["image_id", "image"], batch_size=max(n, 1)):
        for image_id, image in zip(rb.column(0).to_pylist(), rb.column(1).to_pylist()):
            truth = (attrs or {}).get(image_id)
            wrong = [f"{f}: {truth[f]}" for f, ok in attribute_checks(preds.get(image_id, ""), truth).items()
                     if not ok] if truth else []
            out.append({"image_id": image_id, "image": image, "caption": preds.get(image_id, ""),
                        "references": refs.get(image_id, []), "wrong": wrong})
            if len(out) >= n:
                return out
    return out
