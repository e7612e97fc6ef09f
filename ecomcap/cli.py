"""`ecomcap ...` console entry: synth, ingest, prepare, train, generate, evaluate.

User-fixable problems (EcomcapError) print one line on stderr and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ecomcap.errors import EcomcapError

os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")


def _cmd_synth(args: argparse.Namespace) -> int:
    from ecomcap.data.synth import generate_synthetic

    summary = generate_synthetic(
        args.out, train=args.train, valid=args.valid, test=args.test, seed=args.seed,
        image_size=args.image_size, corrupt_rate=args.corrupt_rate, difficulty=args.difficulty,
    )
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _ingest_config(args: argparse.Namespace):
    from ecomcap.config import IngestConfig, load_run_config

    cfg = load_run_config(args.config).data.ingest if args.config else IngestConfig()
    overrides = {"max_bad_rate": args.max_bad_rate}
    if args.style_rule:
        overrides["clean"] = cfg.clean.model_copy(update={"require_style": True})
    return cfg.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _cmd_ingest(args: argparse.Namespace) -> int:
    from ecomcap.data.ingest import ingest_split
    from ecomcap.data.validate import enforce, validate_dataset

    cfg = _ingest_config(args)
    result = ingest_split(args.src, args.split, args.out, cfg)
    report = validate_dataset(result.out_dir, cfg) if not args.no_gx else result.report
    print(_summary(report) if not args.json else json.dumps(report, ensure_ascii=False))
    enforce(report)
    return 0


def _summary(report: dict) -> str:
    lines = [
        f"split {report['split']} ({report['format']}): rows_in {report['rows_in']} = "
        f"ok {report['rows_ok']} + quarantined {report['rows_quarantined']} "
        f"(of them filtered by the brand filter: {report.get('rows_filtered', 0)}; "
        f"bad rate {report['bad_rate']:.2%}, limit {report['max_bad_rate']:.2%})",
        f"  references: {report['refs_in']} in, {report['refs_kept']} kept; "
        f"rules: {json.dumps(report['caption_rules'], ensure_ascii=False)}",
    ]
    for reason, n in report["reasons"].items():
        lines.append(f"  quarantined {reason}: {n}")
    if "gx" in report:
        gx = report["gx"]
        lines.append(f"  great expectations: {gx['evaluated']} evaluated, {'pass' if gx['success'] else 'FAIL'}")
    lines.append(f"  {report['rows_per_s']} rows/s, fingerprint {report['fingerprint'][:12]}")
    return "\n".join(lines)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ecomcap.config import load_run_config
    from ecomcap.data.prepare import prepare_data

    cfg = load_run_config(args.config).data
    try:
        prepare_data(cfg)
    finally:
        for split in cfg.splits:
            path = Path(cfg.work_dir) / split / "report.json"
            if path.is_file():
                print(_summary(json.loads(path.read_text(encoding="utf-8"))))
    return 0


def _run_config(args: argparse.Namespace):
    """The run config of --config FILE or --config-json (a command step's pods get it inline)."""
    from ecomcap.config import RunConfig, load_run_config, parse_model

    if getattr(args, "config_json", None):
        try:
            data = json.loads(args.config_json)
        except json.JSONDecodeError as exc:
            raise EcomcapError(f"--config-json is not JSON: {exc}") from None
        return parse_model(RunConfig, data, "--config-json")
    return load_run_config(args.config) if args.config else None


def _cmd_train(args: argparse.Namespace) -> int:
    from ecomcap.command_steps import read_inputs, train_on_this_node
    from ecomcap.nodes import current_node
    from ecomcap.training.stages import launch_stage, prepared_inputs

    cfg = _run_config(args)
    if cfg is None:
        raise EcomcapError("ecomcap train needs --config FILE (or --config-json)")
    if cfg.launch.nodes == 1 and (node := current_node()) is not None:  # each pod would train the whole stage
        raise EcomcapError(f"this pod is {node.describe()} but launch.nodes is 1: set launch.nodes: {node.count} "
                           "(or run the stage as one pod)")
    if args.inputs:  # a pod of a command step: the regular step before it wrote the inputs
        inputs = read_inputs(args.inputs, args.stage)
    else:
        inputs = prepared_inputs(args.stage, cfg, args.start, args.grounding)
    if cfg.launch.nodes > 1:
        res = train_on_this_node(args.stage, cfg, inputs, args.inputs)
    else:
        res = launch_stage(args.stage, cfg, **inputs)
    if res is None:  # another pod than pod 0: rank 0 (and the result) is on pod 0
        print(json.dumps({"stage": args.stage, "node_done": True}))
        return 0
    print(json.dumps({"stage": args.stage, **{k: res[k] for k in ("model_dir", "steps", "resumed_from", "nodes", "ranks")}},
                     ensure_ascii=False))
    return 0


def _overlay(base: dict, flags: dict) -> dict:
    """`base` with the flags that were given (None: not given) laid over it, nested dicts too."""
    out = dict(base)
    for k, v in flags.items():
        if isinstance(v, dict):
            out[k] = _overlay(out.get(k) or {}, v)
        elif v is not None:
            out[k] = v
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _cmd_generate(args: argparse.Namespace) -> int:
    import tempfile

    from ecomcap.config import GenerateConfig, IngestConfig, RunConfig
    from ecomcap.data.ingest import ingest_split
    from ecomcap.data.shards import read_report
    from ecomcap.inference.batch import caption_dataset, caption_share
    from ecomcap.nodes import current_node

    cfg = _run_config(args) or RunConfig()
    node = current_node()  # a pod of a multi-pod job: its share of the chunks, no merge
    if args.inputs:  # a pod of the `generate_pods` command step: the champion and dataset its regular step gave
        from ecomcap.command_steps import read_inputs
        from ecomcap.workflow import generate_share_stage

        inputs = read_inputs(args.inputs, "generate")
        index, count = (node.rank, node.count) if node else (0, 1)
        n = generate_share_stage(Path(inputs["model"]), Path(inputs["data"]), cfg, index, count)
        print(json.dumps({"pod": index, "pods": count, "images": n}))
        return 0
    missing = [f"--{k}" for k in ("model", "data", "out") if getattr(args, k) is None]
    if missing:
        raise EcomcapError(f"ecomcap generate needs {', '.join(missing)} (or --inputs from a command step)")
    model_cfg, gen = cfg.model, cfg.generate
    flags = {"num_beams": args.beams, "chunks": {"workers": args.workers, "chunk_size": args.chunk_size}}
    gen = GenerateConfig.model_validate(_overlay(gen.model_dump(), flags))  # validated, like a YAML value
    data = Path(args.data)
    if node is not None and not (data / "report.json").is_file():
        raise EcomcapError(f"--data {data}: on a pod of several, give an ingested dataset (`ecomcap ingest` once, "
                           "first): every pod would ingest the whole catalogue")
    with tempfile.TemporaryDirectory() as tmp:
        if not (data / "report.json").is_file():  # raw MUGE files: ingest (checks, quarantine) first
            data = ingest_split(data, args.split, Path(tmp) / args.split,
                                IngestConfig(max_bad_rate=1.0)).out_dir
        if node is not None:
            parts = Path(args.parts or gen.chunks.parts_dir or f"{args.out}.parts")
            n = caption_share(args.model, model_cfg, data, gen, node.rank, node.count, parts)
            print(json.dumps({"pod": node.rank, "pods": node.count, "images": n, "parts": str(parts)}))
            return 0
        preds = caption_dataset(args.model, model_cfg, data, args.out, gen, args.parts)
        report = read_report(data)
    print(json.dumps({"written": len(preds), "out": str(args.out), "rows_quarantined": report["rows_quarantined"]}))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from ecomcap.registry.summary import summary_lines
    from ecomcap.registry.tracking import last_run_summary
    from ecomcap.stores import tracking_uri

    uri = tracking_uri(args.tracking_uri)
    s = last_run_summary(uri, args.experiment)
    if s is None:
        raise EcomcapError(f"no runs in experiment '{args.experiment}' at {uri or 'MLflow default store'}")
    print("\n".join(summary_lines(s, uri or _mlflow_default())))
    return 0


def _mlflow_default() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _cmd_retrain(args: argparse.Namespace) -> int:
    from ecomcap.registry.retrain import retrain

    return retrain(args.config, args.if_changed)


def _cmd_champion(args: argparse.Namespace) -> int:
    """Set `champion` by hand (e.g. a rollback); the gate keeps it until a candidate beats it."""
    from ecomcap.config import load_run_config
    from ecomcap.registry.gate import Gate
    from ecomcap.registry.register import registry_client
    from ecomcap.stores import tracking_uri

    cfg = load_run_config(args.config).registry
    cfg = cfg.model_copy(update={"tracking_uri": tracking_uri(args.tracking_uri, cfg.tracking_uri)})
    gate = Gate(registry_client(cfg), cfg)
    gate.check_reachable()
    try:
        gate.set_by_hand(args.version, args.reason)
    except Exception as exc:  # MLflow: no such version
        raise EcomcapError(f"cannot make version {args.version} of '{cfg.model_name}' champion: "
                           f"{str(exc).splitlines()[0]}") from None
    print(f"champion of '{cfg.model_name}' is now version {args.version} (set by hand: {args.reason})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ecomcap.metrics.evaluate import evaluate_files

    scores = evaluate_files(args.pred, args.gold)
    if args.json:
        print(json.dumps(scores, ensure_ascii=False))
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
    return 0


STORE_HELP = ("MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else this checkout's .mlflow/mlflow.db "
              "as `make` uses)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecomcap", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic MUGE-format dataset")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--valid", type=int, default=200)
    s.add_argument("--test", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--corrupt-rate", type=float, default=0.0)
    s.add_argument("--difficulty", choices=("easy", "hard"), default="easy")
    s.set_defaults(func=_cmd_synth)

    i = sub.add_parser("ingest", help="stream one split into Parquet shards, quarantine bad rows")
    i.add_argument("--src", type=Path, required=True, help="directory with IC_{split}.tsv/.jsonl, or a 3-column TSV")
    i.add_argument("--split", choices=["train", "valid", "test"], required=True)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--max-bad-rate", type=float, default=None)
    i.add_argument("--config", type=Path, default=None, help="YAML with a data.ingest section")
    i.add_argument("--style-rule", action="store_true", help="keep only references stating a …风格 style")
    i.add_argument("--no-gx", action="store_true", help="skip the Great Expectations suite")
    i.add_argument("--json", action="store_true", help="print the full report as JSON")
    i.set_defaults(func=_cmd_ingest)

    r = sub.add_parser("prepare", help="synthesize (if configured), ingest and validate every split")
    r.add_argument("--config", type=Path, required=True)
    r.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("train", help="run a training stage from a run config")
    t.add_argument("--stage", choices=["sft", "scst", "dpo"], required=True)
    t.add_argument("--config", type=Path, default=None)
    t.add_argument("--config-json", default=None, help="the run config inline (what a command step's pods get)")
    t.add_argument("--inputs", type=Path, default=None,
                   help="a command step's handoff file: the datasets, start model and run name its regular step wrote")
    t.add_argument("--from", dest="start", type=Path, default=None,
                   help="SCST, DPO: the model to start from (default: the finished SFT run of this config; DPO after "
                   "SCST: pass the SCST output here)")
    t.add_argument("--grounding", type=Path, default=None,
                   help="SCST, DPO: a grounding step's output (scorer/, evaluator/) for clip / distinct reward terms")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="caption a dataset (ingested dir or raw MUGE dir) -> caption_gen.jsonl")
    g.add_argument("--model", default=None, help="trained output dir, model dir or hub id")
    g.add_argument("--data", type=Path, default=None)
    g.add_argument("--split", default="test", choices=["train", "valid", "test"])
    g.add_argument("--out", type=Path, default=None,
                   help="caption_gen.jsonl; on a pod of several (ZenML / PET_* pod environment): its share's parts only, "
                   "the same command without that environment merges")
    g.add_argument("--config", type=Path, default=None, help="run YAML (model + generate sections)")
    g.add_argument("--config-json", default=None, help="the run config inline (what a command step's pods get)")
    g.add_argument("--inputs", type=Path, default=None, help="a generate_pods command step's handoff file")
    g.add_argument("--beams", type=_positive_int, default=None)
    g.add_argument("--workers", type=_positive_int, default=None, help="worker processes (one per GPU on a GPU node)")
    g.add_argument("--chunk-size", type=_positive_int, default=None, help="images per chunk (the unit of resume)")
    g.add_argument("--parts", type=Path, default=None,
                   help="finished chunks (default: <out>.parts); rerun with the same --out/--parts to resume")
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("summary", help="metrics, attribute accuracy, gate decision of the newest pipeline run")
    m.add_argument("--tracking-uri", default=None, help=STORE_HELP)
    m.add_argument("--experiment", default="training_pipeline")
    m.set_defaults(func=_cmd_summary)

    rt = sub.add_parser("retrain", help="run the training pipeline (with --if-changed: only on new data/config)")
    rt.add_argument("--config", type=Path, required=True)
    rt.add_argument("--if-changed", action="store_true")
    rt.set_defaults(func=_cmd_retrain)

    e = sub.add_parser("evaluate", help="CIDEr-D / BLEU-4 / ROUGE-L of caption_gen.jsonl against gold")
    e.add_argument("--pred", type=Path, required=True)
    e.add_argument("--gold", type=Path, required=True)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("champion", help="set the registry's champion by hand (e.g. a rollback)")
    c.add_argument("--config", required=True, help="run config (its registry section)")
    c.add_argument("--version", required=True)
    c.add_argument("--reason", required=True, help="recorded on the version")
    c.add_argument("--tracking-uri", default=None, help=STORE_HELP.replace("default: ", "default: registry.tracking_uri, "))
    c.set_defaults(func=_cmd_champion)

    from ecomcap.retrieval.cli import add_retrieval_commands

    add_retrieval_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # arguments that are not valid UTF-8 (undecodable file names) reach us as lone surrogates:
    # print them escaped instead of dying on the first print
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EcomcapError as exc:
        print(f"ecomcap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
