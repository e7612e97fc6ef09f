"""`ecomcap search` and `ecomcap serve-search`: the retrieval job's commands on the shared CLI."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _searcher(args: argparse.Namespace):
    from ecomcap.retrieval.search import champion_gallery, open_searcher
    from ecomcap.retrieval.store import StoreConfig

    if args.gallery:
        gallery = args.gallery
    else:
        from ecomcap.stores import tracking_uri

        gallery = champion_gallery(tracking_uri(args.tracking_uri))
    return open_searcher(gallery, StoreConfig(uri=args.store_uri, ef=args.ef))


def _cmd_search(args: argparse.Namespace) -> int:
    searcher = _searcher(args)
    try:
        result = searcher.search(args.query, args.top)
    finally:
        searcher.store.close()
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(f"top {len(result['results'])} for “{result['query']}” ({result['took_ms']:.1f} ms, "
          f"gallery {searcher.gallery.path}):")
    for r in result["results"]:
        print(f"{r['rank']:>3}  {r['score']:.4f}  {r['item_id']}  {r['text']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ecomcap.retrieval.serve import serve

    serve(_searcher(args), args.host, args.port)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    # light: store.py imports the gallery (and so transformers) for annotations only
    from ecomcap.retrieval.store import StoreConfig

    store = StoreConfig()
    p.add_argument("--gallery", type=Path, default=None,
                   help="a gallery index directory; default: the registry's ecomcap-retriever@champion")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else this checkout's "
                   ".mlflow/mlflow.db as `make retrieval` writes it)")
    p.add_argument("--store-uri", default=store.uri,
                   help=f"vector store: a *.db file (embedded Milvus Lite) or http://host:19530 (server); "
                        f"default: {store.uri}")
    p.add_argument("--ef", type=int, default=store.ef,
                   help=f"HNSW search breadth: higher = better recall, slower (default {store.ef})")


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
    _common(v)
    v.set_defaults(func=_cmd_serve)
