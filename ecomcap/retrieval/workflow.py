"""The retrieval pipeline's stages as plain functions (the ZenML steps only call these):
ingest -> validate -> train -> embed gallery -> evaluate -> promote, with MLflow logging."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecomcap.registry import tracking
from ecomcap.retrieval.config import RetrievalRunConfig

KEYS = ("R@1", "R@5", "R@10", "MeanRecall")


def _scratch(cfg: RetrievalRunConfig, what: str) -> Path:
    from ecomcap.workflow import scratch_dir

    return scratch_dir(cfg.data.work_dir, what)


def ingest_stage(cfg: RetrievalRunConfig, split: str) -> Path:
    from ecomcap.retrieval.data.prepare import ingest_retrieval

    out = _scratch(cfg, f"ingest-{split}")
    ingest_retrieval(cfg.data, split, out)
    return out


def validate_stage(splits: dict[str, Path], cfg: RetrievalRunConfig) -> dict[str, Any]:
    """GX suite on each split's items + the bad-row gate on items and queries; logs reports and
    records each split as an MLflow input data set (digest = its fingerprint)."""
    from ecomcap.data.validate import enforce, validate_dataset
    from ecomcap.retrieval.data.prepare import enforce_retrieval
    from ecomcap.workflow import record_datasets

    tracking.log_config("data", cfg.data)
    reports, gx_reports = {}, {}
    for split, path in splits.items():
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        gx_reports[split] = validate_dataset(path / "items", cfg.data.ingest, write=False)
        report["items"]["gx"] = gx_reports[split].get("gx")
        report["passed"] = report["passed"] and gx_reports[split]["passed"]
        reports[split] = report
        tracking.log_text(json.dumps(report, ensure_ascii=False, indent=2, default=str),
                          f"data_validation/{split}_report.json")
        for table in ("items", "queries"):
            if table in report:
                tracking.log_metrics({k: report[table][k] for k in ("rows_in", "rows_ok", "rows_quarantined")},
                                     prefix=f"data.{split}.{table}.")
    record_datasets("retrieval", {s: {"fingerprint": r["fingerprint"], **{k: r["items"][k] for k in (
        "rows_ok", "rows_quarantined")}} for s, r in reports.items()}, splits)
    tracking.set_tags({"eval_fingerprint": reports.get("valid", {}).get("fingerprint", ""),
                       "config_hash": tracking.config_hash(cfg), "code_version": tracking.code_version()})
    for split, report in reports.items():
        enforce_retrieval(report)
        enforce({**gx_reports[split], "split": f"{split} items"})  # the GX verdict
    return reports


def train_stage(train: Path, valid: Path, cfg: RetrievalRunConfig, run_name: str) -> Path:
    """Train in processes of their own, the way the captioning steps do (`ecomcap.launch`)."""
    from ecomcap.launch import launch

    for section in ("encoder", "train"):
        tracking.log_config(section, getattr(cfg, section))
    res = launch(f"{__name__}:train_process", {"train": str(train), "valid": str(valid), "run_name": run_name,
                                               "config": cfg.model_dump(mode="json")}, cfg.launch, name="train")
    tracking.log_metrics({k: res[k] for k in ("trainable_params", "total_params", "wall_s", "steps")},
                         prefix="train.")
    return Path(res["model_dir"])


def train_process(train: str, valid: str, config: dict, run_name: str) -> dict[str, Any]:
    """One training process (rank 0's return is kept)."""
    from ecomcap.retrieval.train.loop import train_retriever

    cfg = RetrievalRunConfig.model_validate(config)
    tc = cfg.train.model_copy(update={"output_dir": Path(cfg.train.output_dir) / run_name})
    res = train_retriever(Path(train), Path(valid), cfg.model_copy(update={"train": tc}), tracking.metrics_callback())
    return {"model_dir": str(res.model_dir), "trainable_params": res.params.trainable,
            "total_params": res.params.total, "wall_s": res.wall_s, "steps": res.steps}


def embed_stage(model_dir: Path, valid: Path, cfg: RetrievalRunConfig) -> Path:
    """The versioned gallery artifact: the valid split's items embedded by the candidate."""
    from ecomcap.retrieval.index.gallery import embed_gallery

    return embed_gallery(model_dir, valid / "items", _scratch(cfg, "gallery") / "gallery",
                         device=cfg.encoder.torch_device(), search=cfg.index.model_dump(mode="json"))


def score_gallery(gallery_dir: Path, valid: Path, cfg: RetrievalRunConfig) -> dict[str, Any]:
    """MUGE scores of the gallery's encoder on the valid queries, ranked by the index the gallery
    records (what `ecomcap search`, the page and the pyfunc serve), plus that index's recall@10
    against exact search (`index_recall10`, 1.0 for an exact index): the gate's minimum."""
    from ecomcap.retrieval.data.ingest import read_queries
    from ecomcap.retrieval.evaluate.metrics import chance_recall, recall_scores
    from ecomcap.retrieval.index.gallery import load_gallery
    from ecomcap.retrieval.index.open import open_index
    from ecomcap.retrieval.index.recall import recall_vs_exact

    gal = load_gallery(gallery_dir)
    queries = read_queries(valid)
    q = gal.encoder(cfg.encoder.torch_device()).encode_texts([x["query_text"] for x in queries])
    index = open_index(gal)
    try:
        _, rows = index.search(q, 10)
        index_recall = recall_vs_exact(index, gal.vectors, q, 10)
    finally:
        index.close()
    pred = {x["query_id"]: [gal.item_ids[j] for j in r if j >= 0] for x, r in zip(queries, rows)}
    gold = {x["query_id"]: x["item_ids"] for x in queries}
    scores = recall_scores(pred, gold, check=False)  # a gallery under 10 items, or an IVF miss, gives fewer
    scores["index_recall@10"] = index_recall
    scores["chance"] = chance_recall(len(gal.item_ids), [len(v) for v in gold.values()])
    scores["ranked"], scores["queries"], scores["gold"] = pred, queries, gold
    return scores


def evaluate_stage(gallery_dir: Path, valid: Path, train: Path, cfg: RetrievalRunConfig,
                   log: bool = True) -> tuple[dict[str, Any], str, str]:
    """(metrics, eval fingerprint, query-results HTML); logs Recall@K, the zero-shot vs
    fine-tuned (image / text / fused items) table, matching F1 and the top-5 picture."""
    from ecomcap.retrieval.evaluate.embed import embed_split, matching_of, recall_of
    from ecomcap.retrieval.evaluate.figures import query_grid, query_html
    from ecomcap.retrieval.evaluate.metrics import tracking_names
    from ecomcap.retrieval.index.gallery import load_gallery
    from ecomcap.retrieval.model.encoder import load_encoder

    scores = score_gallery(gallery_dir, valid, cfg)
    metrics: dict[str, Any] = tracking_names(scores)
    per_query = scores["per_query"]
    eval_fp = json.loads((valid / "report.json").read_text(encoding="utf-8"))["fingerprint"]
    gal = load_gallery(gallery_dir)
    shown = scores["queries"][: cfg.eval.figure_queries]
    rows = [{"query_text": x["query_text"], "ranked": scores["ranked"][x["query_id"]],
             "gold": set(scores["gold"][x["query_id"]])} for x in shown]
    images = gal.images(sorted({i for r in rows for i in r["ranked"][:5]}))
    page = query_html(rows, images, metrics)
    if not log:
        return {**metrics, "per_query": per_query}, eval_fp, page
    table = []
    for name, path in (("zero-shot", cfg.encoder.name_or_path), ("fine-tuned", gal.encoder_dir)):
        enc = load_encoder(path, device=cfg.encoder.torch_device(), max_unknown_share=cfg.encoder.max_unknown_share)
        for mode in ("image", "text", "fused"):
            s = recall_of(embed_split(enc, valid, mode))
            table.append({"model": name, "item": mode, **{k: round(s[k], 2) for k in KEYS}})
        mode = cfg.encoder.item_embedding
        match = matching_of(enc, train, mode, cfg.eval.match_thresholds, at_least_two=cfg.eval.match_at_least_two)
        if match is not None:
            f1 = matching_of(enc, valid, mode, [], threshold=match["threshold"],
                             at_least_two=cfg.eval.match_at_least_two)
            metrics[f"match_F1.{name}"] = f1["F1"]
    tracking.log_metrics(metrics)
    tracking.log_metrics(tracking_names(scores["chance"]), prefix="chance.")
    tracking.log_text(json.dumps(table, ensure_ascii=False, indent=2), "comparison_table.json")
    tracking.log_text(_markdown(table, scores["chance"]), "comparison_table.md")
    tracking.log_text(page, "query_results.html")
    png = _scratch(cfg, "figure") / "query_top5.png"
    query_grid(rows, images).save(png)
    tracking.log_artifact(png)
    return {**metrics, "per_query": per_query, "table": table}, eval_fp, page


def _markdown(table: list[dict[str, Any]], chance: dict[str, float]) -> str:
    lines = ["| model | item | R@1 | R@5 | R@10 | MeanRecall |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['item']} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS) + " |" for r in table]
    lines.append("| chance | - | " + " | ".join(f"{chance[k]:.2f}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"
