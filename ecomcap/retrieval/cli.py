"""The retrieval job's commands on the shared CLI: `retrieval-evaluate`, `retrieval-table`,
`search`, `serve-search` and `index-catalogue` (registered by `ecomcap.cli`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecomcap.errors import EcomcapError


def _read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise EcomcapError(f"{what} file {path} does not exist")
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise EcomcapError(f"{path.name} line {no}: invalid JSON ({exc})") from None
        if not isinstance(obj, dict) or "query_id" not in obj:
            raise EcomcapError(f"{path.name} line {no}: expected an object with query_id")
        rows.append(obj)
    return rows


def load_submission(pred: Path, gold: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(predictions, gold) by query id; EcomcapError with the file and line for malformed rows."""
    gold_map: dict[str, list[str]] = {}
    for no, row in enumerate(_read_jsonl(gold, "gold"), start=1):
        qid, items = str(row["query_id"]), row.get("item_ids")
        if qid in gold_map:
            raise EcomcapError(f"{gold.name} line {no}: query {qid} appears twice in the gold file")
        if not isinstance(items, list) or not items:
            raise EcomcapError(f"{gold.name} line {no}: query {qid} has no item_ids (a gold row needs "
                               "at least one relevant item; is this the queries file without answers?)")
        gold_map[qid] = [str(i) for i in items]
    pred_map: dict[str, list[str]] = {}
    for _no, row in enumerate(_read_jsonl(pred, "prediction"), start=1):
        qid, items = str(row["query_id"]), row.get("item_ids")
        if not isinstance(items, list):
            raise EcomcapError(f"query {qid}: item_ids is not a list")
        if qid in pred_map:
            raise EcomcapError(f"query {qid}: predicted twice")
        pred_map[qid] = [str(i) for i in items]
    return pred_map, gold_map


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ecomcap.retrieval.evaluate.metrics import recall_scores

    pred, gold = load_submission(args.pred, args.gold)
    scores = recall_scores(pred, gold)
    out = {k: round(scores[k], 2) for k in ("R@1", "R@5", "R@10", "MeanRecall")}
    print(json.dumps(out) if args.json else "  ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from ecomcap.config import load_run_config
    from ecomcap.retrieval.config import RetrievalRunConfig
    from ecomcap.retrieval.train.experiments import comparison_table, format_table

    cfg = load_run_config(args.config, RetrievalRunConfig)
    from ecomcap.stores import tracking_uri

    uri = tracking_uri(args.tracking_uri, must_exist=False)
    if uri:  # the table as one MLflow run: table.md/json plus each row's figures
        import mlflow

        from ecomcap.registry import tracking

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("retrieval_comparison")
        with mlflow.start_run(run_name="comparison_table"):
            result = comparison_table(cfg, Path(args.out))
            tracking.log_artifact(Path(args.out) / "table.md")
            tracking.log_artifact(Path(args.out) / "table.json")
            for i, row in enumerate(result["rows"]):
                tracking.log_metrics({k.replace("@", ""): v for k, v in row.items() if k not in ("name", "item")},
                                     prefix=f"row{i}.")
            mlflow.set_tags({f"row{i}": r["name"] for i, r in enumerate(result["rows"])})
    else:
        result = comparison_table(cfg, Path(args.out))
    print(format_table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"rows": result["rows"]}, ensure_ascii=False))
    return 0


def add_retrieval_commands(sub) -> None:
    e = sub.add_parser("retrieval-evaluate", help="MUGE Recall@1/5/10 + MeanRecall of a retrieval submission")
    e.add_argument("--pred", type=Path, required=True, help='JSONL: {"query_id", "item_ids": [10 ids]}')
    e.add_argument("--gold", type=Path, required=True, help="MUGE queries JSONL with item_ids")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    t = sub.add_parser("retrieval-table", help="zero-shot vs InfoNCE vs sigmoid vs +hard negatives vs fused")
    t.add_argument("--config", type=Path, required=True, help="retrieval run YAML (configs/retrieval_local.yaml)")
    t.add_argument("--out", type=Path, default=Path(".run/retrieval/table"))
    t.add_argument("--tracking-uri", default=None, help="log the table to MLflow (default: MLFLOW_TRACKING_URI, else this checkout's "
                   ".mlflow/mlflow.db where it exists)")
    t.set_defaults(func=_cmd_table)
    add_search_commands(sub)


def _searcher(args: argparse.Namespace):
    from ecomcap.retrieval.index.gallery import open_gallery
    from ecomcap.retrieval.serve.search import Searcher, champion_gallery, serving_index

    if args.gallery:
        path = args.gallery
    else:
        from ecomcap.stores import tracking_uri

        path = champion_gallery(tracking_uri(args.tracking_uri), alias=args.alias,
                                fallback=not args.no_champion_fallback)
    gallery = open_gallery(path)
    index, gated = serving_index(gallery, args.index, args.store_uri, args.ef)
    return Searcher(gallery, index, gated=gated)


def _cmd_search(args: argparse.Namespace) -> int:
    searcher = _searcher(args)
    try:
        result = searcher.search(args.query, args.top)
    finally:
        searcher.close()
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(f"top {len(result['results'])} for “{result['query']}” ({result['took_ms']:.1f} ms, "
          f"gallery {searcher.gallery.path}):")
    for r in result["results"]:
        print(f"{r['rank']:>3}  {r['score']:.4f}  {r['item_id']}  {r['text']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ecomcap.retrieval.serve.page import serve

    serve(_searcher(args), args.host, args.port, args.max_pending, args.max_batch)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from ecomcap.retrieval.index.base import IndexConfig
    from ecomcap.retrieval.index.milvus import StoreConfig

    p.add_argument("--gallery", type=Path, default=None,
                   help="a gallery index directory; default: the registry's ecomcap-retriever@<alias>")
    p.add_argument("--alias", default="serving",
                   help="registry alias to serve (default: serving, the index job's catalogue; champion when unset)")
    p.add_argument("--no-champion-fallback", action="store_true",
                   help="serve only the alias asked for: no champion (the gate's valid split) before the first index")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else this checkout's "
                   ".mlflow/mlflow.db as `make retrieval` writes it)")
    p.add_argument("--index", default="recorded", choices=["recorded", "auto", "exact", "hnsw", "ivf", "milvus"],
                   help="how to search: recorded = the index the gallery was evaluated and gated with (default); "
                        "another kind serves what the gate did not score")
    p.add_argument("--store-uri", default=None,
                   help=f"an index of kind milvus: a *.db file (Milvus Lite) or http://host:19530 (server) in "
                        f"place of the recorded one (default: recorded, else {StoreConfig().uri})")
    p.add_argument("--ef", type=int, default=None,
                   help=f"HNSW search breadth: higher = better recall, slower (default {IndexConfig().ef} in "
                        f"process, {StoreConfig().ef} in Milvus)")


def _cmd_index(args: argparse.Namespace) -> int:
    from ecomcap.config import load_run_config
    from ecomcap.retrieval.index.catalogue import IndexJobConfig
    from ecomcap.retrieval.index_job import run_job
    from ecomcap.stores import tracking_uri

    cfg = load_run_config(args.config, IndexJobConfig)
    cat = cfg.catalogue.model_copy(update={k: v for k, v in (("synthetic_items", args.synthetic),
                                                             ("changed_share", args.changed_share)) if v is not None})
    reg = cfg.registry.model_copy(update={"tracking_uri": tracking_uri(args.tracking_uri, cfg.registry.tracking_uri)})
    result = run_job(cfg.model_copy(update={"catalogue": cat, "registry": reg}))
    print(f"indexed {result['items']} items ({result['embedded']} embedded, {result['reused']} reused) -> version "
          f"{result['version']}; recall@10 vs exact {result['recall']:.4f}; "
          f"{'serving moved' if result['alias_moved'] else 'serving NOT moved (recall below the minimum)'}")
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["alias_moved"] else 1


def add_search_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("search", help="text -> top products of the champion's (or a gallery's) index")
    s.add_argument("query")
    s.add_argument("--top", type=int, default=10)
    s.add_argument("--json", action="store_true")
    _common(s)
    s.set_defaults(func=_cmd_search)

    v = sub.add_parser("serve-search", help="the search page (images and texts of the top items)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8300)
    v.add_argument("--max-pending", type=int, default=256,
                   help="searches allowed to wait; beyond them a request is answered 503 at once")
    v.add_argument("--max-batch", type=int, default=32, help="queries encoded and searched together (1: no batching)")
    _common(v)
    v.set_defaults(func=_cmd_serve)

    x = sub.add_parser("index-catalogue", help="embed a catalogue with the champion encoder, register it, alias serving")
    x.add_argument("--config", type=Path, required=True, help="index job YAML (configs/retrieval_index.yaml)")
    x.add_argument("--synthetic", type=int, default=None, help="override catalogue.synthetic_items")
    x.add_argument("--changed-share", type=float, default=None, help="override catalogue.changed_share")
    x.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default: registry.tracking_uri, "
                   "$MLFLOW_TRACKING_URI, else this checkout's .mlflow/mlflow.db)")
    x.set_defaults(func=_cmd_index)
