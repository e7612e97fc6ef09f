"""The comparison docs/benchmarks.md reports: zero-shot vs InfoNCE vs sigmoid vs + hard negatives vs fused
items, on one prepared data set, with the chance level and product-matching F1 before/after.

Each fine-tuned row is a full training run of the configured encoder (same steps, batch, seed);
the matching threshold is tuned on the train split's product groups and applied to valid, with
the row's own item embedding (a posting is an image plus its title).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ecomcap.retrieval.config import HardNegativeConfig, RetrievalRunConfig
from ecomcap.retrieval.data.ingest import read_queries
from ecomcap.retrieval.data.prepare import prepare_retrieval_data
from ecomcap.retrieval.evaluate.embed import embed_split, matching_of, recall_of
from ecomcap.retrieval.model.encoder import load_encoder, save_encoder
from ecomcap.retrieval.train.loop import prepare_encoder, train_retriever

KEYS = ("R@1", "R@5", "R@10", "MeanRecall")


def variants(cfg: RetrievalRunConfig) -> list[tuple[str, RetrievalRunConfig]]:
    """(row name, run config) of each fine-tuned row."""
    hn = cfg.train.hard_negatives.model_copy(update={"enabled": True})
    out = []
    for name, loss, neg, mode in (("InfoNCE", "infonce", False, "image"), ("sigmoid", "sigmoid", False, "image"),
                                  ("InfoNCE + hard negatives", "infonce", True, "image"),
                                  ("InfoNCE + hard negatives, fused items", "infonce", True, "fused")):
        train = cfg.train.model_copy(update={"loss": loss, "resume": False,
                                             "hard_negatives": hn if neg else HardNegativeConfig(enabled=False)})
        out.append((name, cfg.model_copy(update={"train": train,
                                                 "encoder": cfg.encoder.model_copy(update={"item_embedding": mode})})))
    return out


def score_encoder(model_dir: Path, dirs: dict[str, Path], mode: str, cfg: RetrievalRunConfig) -> dict[str, Any]:
    enc = load_encoder(model_dir)
    scores = recall_of(embed_split(enc, dirs["valid"], mode))
    row: dict[str, Any] = {k: round(scores[k], 2) for k in KEYS}
    tuned = matching_of(enc, dirs["train"], mode, cfg.eval.match_thresholds, at_least_two=cfg.eval.match_at_least_two)
    if tuned is not None:
        valid = matching_of(enc, dirs["valid"], mode, [], threshold=tuned["threshold"],
                            at_least_two=cfg.eval.match_at_least_two)
        row.update(match_F1=round(valid["F1"], 2), match_threshold=tuned["threshold"])
    return row | {"_chance": scores["chance"]}


def comparison_table(cfg: RetrievalRunConfig, out_dir: Path) -> dict[str, Any]:
    """Run every row; write ``table.json`` and ``table.md`` under out_dir and return the result."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = prepare_retrieval_data(cfg.data)
    vocab = _vocab(dirs["train"])
    dual, pre, _ = prepare_encoder(cfg, vocab)
    zero = save_encoder(dual, pre, out_dir / "zero_shot", item_embedding="image")
    rows = [{"name": "zero-shot (random init)", "item": "image", **score_encoder(zero, dirs, "image", cfg)}]
    chance = rows[0].pop("_chance")
    for name, run_cfg in variants(cfg):
        run_cfg = run_cfg.model_copy(update={"train": run_cfg.train.model_copy(
            update={"output_dir": out_dir / name.replace(" ", "_").replace(",", "").replace("+", "plus")})})
        t0 = time.perf_counter()
        result = train_retriever(dirs["train"], dirs["valid"], run_cfg)
        mode = run_cfg.encoder.item_embedding
        row = {"name": name, "item": mode, **score_encoder(result.model_dir, dirs, mode, cfg),
               "steps": result.steps, "train_s": round(time.perf_counter() - t0, 1)}
        row.pop("_chance")
        rows.append(row)
    result = {"rows": rows, "chance": {k: round(v, 2) for k, v in chance.items()},
              "valid_queries": len(read_queries(dirs["valid"])), "wall_s": round(time.perf_counter() - started, 1),
              "config": {"encoder": cfg.encoder.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                         "synth": cfg.data.synth.model_dump(mode="json")}}
    (out_dir / "table.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    (out_dir / "table.md").write_text(format_table(result) + "\n", encoding="utf-8")
    return result


def _vocab(train_dir: Path) -> list[str]:
    from ecomcap.retrieval.data.batches import TrainingSet

    return TrainingSet(train_dir).texts_for_vocab()


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per model, chance level last."""
    head = "| model | item embedding | R@1 | R@5 | R@10 | MeanRecall | matching F1 (valid) |"
    lines = [head, "|" + "---|" * 7]
    for r in result["rows"]:
        f1 = f"{r['match_F1']:.2f} (t={r['match_threshold']})" if "match_F1" in r else "-"
        lines.append(f"| {r['name']} | {r['item']} | {r['R@1']:.2f} | {r['R@5']:.2f} | {r['R@10']:.2f} | "
                     f"{r['MeanRecall']:.2f} | {f1} |")
    c = result["chance"]
    lines.append(f"| chance level | - | {c['R@1']:.2f} | {c['R@5']:.2f} | {c['R@10']:.2f} | {c['MeanRecall']:.2f} | - |")
    return "\n".join(lines)
