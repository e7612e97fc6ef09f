"""Captions that see: one table of second-stage variants from the same SFT checkpoint.

    python benchmarks/grounding.py --seed 0 --scst-steps 60
    python benchmarks/grounding.py --seed 1 --rows sft,scst_cider,scst_clip   # another seed, some rows
    python benchmarks/grounding.py --rows "" --work .run/g2 --set grounding.train.max_steps=800  # probe only

Reads configs/local_grounded.yaml (or --config, with dotted --set overrides), trains the grounding scorer
and the independent evaluator once (train split only; their probe accuracies are printed), one
SFT per seed, then each row from that SFT model: SFT, SFT + rerank, SCST CIDEr-D only, SCST +
CLIP-S (two λ), SCST + distinctiveness, DPO (CIDEr-D or + CLIP-S ranking the attribute-right samples), the
best second stage + rerank. Columns: CIDEr-D, BLEU-4,
attribute accuracy (mean and each), evaluator caption->image R@1, evaluator CLIP-S, distinct
captions, top-opener share, seconds (SCST + generation wall), and the reward's share of an SCST
step. Writes <work>/table_seed<N>.{md,json}; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.first_run_stages import load  # noqa: E402

ROWS = {  # name -> (second stage or None, its reward, rerank candidates)
    "sft": (None, None, 0),
    "sft_rerank": (None, None, 5),
    "scst_cider": ("scst", {"cider": 1.0}, 0),
    "scst_clip": ("scst", {"cider": 1.0, "clip": 1.0, "repeat": 1.0}, 0),
    "scst_clip_hi": ("scst", {"cider": 1.0, "clip": 3.0, "repeat": 1.0}, 0),
    "scst_dist": ("scst", {"cider": 1.0, "distinct": 0.5, "repeat": 1.0}, 0),
    "scst_clip_dist": ("scst", {"cider": 1.0, "clip": 1.0, "distinct": 0.5, "repeat": 1.0}, 0),
    "dpo": ("dpo", {"cider": 1.0}, 0),  # pairs ranked by CIDEr-D among attribute-right samples
    "dpo_clip": ("dpo", {"cider": 1.0, "clip": 1.0}, 0),
}


def evaluate(cfg, model_dir: Path, out: Path, evaluator, rerank: int, scorer_dir: Path, mu: float) -> dict:
    from ecomcap.data.shards import read_references
    from ecomcap.grounding.evaluate import grounded_metrics
    from ecomcap.inference.batch import generate_for_dataset
    from ecomcap.metrics.attributes import read_attributes
    from ecomcap.metrics.report import caption_report
    from ecomcap.modeling.load import load_trained

    gen = cfg.generate.model_copy(update={"rerank": cfg.generate.rerank.model_copy(update={
        "candidates": rerank, "weight": mu, "scorer_dir": str(scorer_dir)})})
    t0 = time.perf_counter()
    model, processor = load_trained(model_dir, cfg.model)
    valid = Path(cfg.data.work_dir) / "valid"
    preds = generate_for_dataset(model, processor, cfg.model.prompt, valid, out, gen)
    gen_s = time.perf_counter() - t0
    rep = caption_report(preds, read_references(valid), read_attributes(Path(cfg.data.work_dir) / "raw" /
                                                                        "attributes_valid.jsonl"))
    rep.update(grounded_metrics(preds, valid, evaluator))
    row = {k: round(float(rep[k]), 4) for k in ("CIDEr-D", "BLEU-4", "cap2img_R1", "clip_s_eval", "top_opener_share")}
    row.update({f"attr_{k}": round(v, 4) for k, v in rep["attributes"].items() if k != "n"},
               distinct=rep["distinct"], generate_s=round(gen_s, 1), samples=list(preds.values())[:4])
    return row


def reward_share(metrics_log: Path, batch: int) -> float | None:
    """Mean over steps of reward seconds / step seconds (step seconds = batch / images_per_s)."""
    if not metrics_log.is_file():
        return None
    rows = [json.loads(x) for x in metrics_log.read_text(encoding="utf-8").splitlines() if x.strip()]
    shares = [r["reward_s"] / (batch / r["images_per_s"]) for r in rows if "reward_s" in r and r.get("images_per_s")]
    return round(sum(shares) / len(shares), 4) if shares else None


def second_stage(stage: str, reward: dict, cfg, start: Path, train: Path, valid: Path, out: Path, gdir: Path):
    """SCST or DPO from `start` with this row's reward, the config's other settings."""
    from ecomcap.training.dpo import run_dpo
    from ecomcap.training.scst import run_scst
    from ecomcap.training.stages import training_attributes

    stage_cfg = getattr(cfg, stage)
    stage_cfg = stage_cfg.model_copy(update={"output_dir": out, "resume": False, "enabled": True,
                                             "reward": stage_cfg.reward.model_validate(reward)})
    common = dict(dev_images=cfg.data.dev_images, scorer_dir=gdir / "scorer", grounding=cfg.grounding)
    if stage == "dpo":
        return run_dpo(start, train, valid, cfg.model, stage_cfg, cfg.generate, attributes=training_attributes(cfg),
                       **common)
    return run_scst(start, train, valid, cfg.model, stage_cfg, cfg.generate, **common)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "local_grounded.yaml")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. scst.lr=5e-4")
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_grounding")
    ap.add_argument("--seed", type=int, default=0, help="SFT/SCST/model-init seed (data and scorer stay fixed)")
    ap.add_argument("--rows", default="sft,sft_rerank,scst_cider,scst_clip,scst_clip_hi,scst_dist,dpo,best_rerank",
                    help=f"comma-separated, of {', '.join(ROWS)}, best_rerank; empty: the encoders' probe only")
    ap.add_argument("--scst-steps", type=int, default=60)
    ap.add_argument("--mu", type=float, default=1.0, help="rerank weight of CLIP-S")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suffix", default="", help="appended to the row names (variants of a row, e.g. another --set)")
    ap.add_argument("--stop-after-sft", action="store_true", help="train (or find) this seed's SFT model, then stop")
    ap.add_argument("--grounding", type=Path, default=None,
                    help="an already built grounding directory (scorer/, evaluator/) for this data; default: "
                    "<work>/grounding, trained when missing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    from ecomcap.data.prepare import prepare_data
    from ecomcap.grounding.scorer import GroundingScorer
    from ecomcap.grounding.train import build_grounding
    from ecomcap.metrics.attributes import read_attributes
    from ecomcap.modeling.prepare import ensure_model
    from ecomcap.training.sft import run_sft

    s = args.seed
    sets = [*args.set, f"sft.seed={s}", f"scst.seed={s}", f"dpo.seed={s}", f"model.tiny.seed={s}", "grounding.enabled=true",
            f"scst.max_steps={args.scst_steps}"]
    cfg = load(args.config, sets, args.work, f"seed{s}")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(args.work / f"tiny-{s}")})})
    prepare_data(cfg.data)
    train, valid = Path(cfg.data.work_dir) / "train", Path(cfg.data.work_dir) / "valid"
    out = args.work / f"seed{s}"
    wanted = [r for r in args.rows.split(",") if r]
    sft_dir, sft_s = None, None
    done = out / "sft_model.json"  # one SFT per seed, reused by later invocations (rows added later)
    sft_key = json.dumps([cfg.sft.model_dump(mode="json", exclude={"output_dir"}), cfg.model.tiny.model_dump()
                          if cfg.model.tiny else None], sort_keys=True, default=str)
    earlier_sft = json.loads(done.read_text()) if done.is_file() else {}
    if wanted and earlier_sft.get("key", sft_key) == sft_key and earlier_sft:  # (files before the key: reused)
        sft_dir, sft_s = Path(earlier_sft["model_dir"]), earlier_sft["sft_s"]
    elif wanted:
        ensure_model(cfg.model, train)
        t0 = time.perf_counter()
        sft = run_sft(train, valid, cfg.model, cfg.finetune, cfg.sft, cfg.generate, dev_images=cfg.data.dev_images)
        sft_dir, sft_s = sft.model_dir, round(time.perf_counter() - t0, 1)
        out.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"model_dir": str(sft_dir), "sft_s": sft_s, "key": sft_key}))
    if args.stop_after_sft:
        return
    gdir = args.grounding or args.work / "grounding"
    if not (gdir / "evaluator" / "grounding.json").is_file():
        t0 = time.perf_counter()
        build_grounding(train, valid, cfg.grounding, gdir,
                        attributes=read_attributes(Path(cfg.data.work_dir) / "raw" / "attributes_valid.jsonl"))
        print(f"grounding encoders trained in {time.perf_counter() - t0:.0f} s", flush=True)
    probes = {r: json.loads((gdir / r / "grounding.json").read_text())["probe"] for r in ("scorer", "evaluator")}
    print("probe", json.dumps(probes), flush=True)
    evaluator = GroundingScorer(gdir / "evaluator")
    if not wanted:  # --rows "": the encoders and their probe only
        print(json.dumps({"probe": probes}))
        return
    rows = {}
    for row in [r for r in wanted if r in ROWS]:
        stage, reward, rerank = ROWS[row]
        name = row + args.suffix
        model_dir, scst_s, share = sft_dir, 0.0, None
        if stage is not None:
            t0 = time.perf_counter()
            res = second_stage(stage, reward, cfg, sft_dir, train, valid, out / name, gdir)
            scst_s, model_dir = time.perf_counter() - t0, res.model_dir
            share = reward_share(Path(res.model_dir) / "metrics.jsonl", cfg.scst.batch_size) if stage == "scst" else None
        rows[name] = {**evaluate(cfg, model_dir, out / f"gen_{name}.jsonl", evaluator, rerank, gdir / "scorer",
                                 args.mu), "scst_s": round(scst_s, 1), "reward_share": share, "model_dir": str(model_dir)}
        print(name, json.dumps(rows[name], ensure_ascii=False), flush=True)
    if "best_rerank" in wanted:
        scst_rows = {k: v for k, v in rows.items() if ROWS.get(k.removesuffix(args.suffix), (None,))[0] is not None}
        if scst_rows:
            best = max(scst_rows, key=lambda k: scst_rows[k]["attr_mean"] + scst_rows[k]["cap2img_R1"])
            name = "best_rerank" + args.suffix
            rows[name] = {**evaluate(cfg, Path(rows[best]["model_dir"]), out / f"gen_{name}.jsonl",
                                     evaluator, 5, gdir / "scorer", args.mu), "of": best}
            print(name, json.dumps(rows[name], ensure_ascii=False), flush=True)
    cols = ["of", "CIDEr-D", "BLEU-4", "attr_mean", "attr_category", "attr_colour", "attr_pattern", "attr_brand",
            "cap2img_R1", "clip_s_eval", "distinct", "top_opener_share", "scst_s", "generate_s", "reward_share"]
    table = out / f"table_seed{s}.json"  # rows of earlier invocations kept (a row run again replaces its own)
    earlier = json.loads(table.read_text(encoding="utf-8"))["rows"] if table.is_file() else {}
    rows = {**earlier, **{k: {c: v.get(c) for c in cols} for k, v in rows.items()}}
    md = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {k} | " + " | ".join(str(v.get(c, "")) for c in cols) + " |" for k, v in rows.items()]
    (out / f"table_seed{s}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    summary = {"seed": s, "sft_s": sft_s, "scst_steps": args.scst_steps, "probe": probes,
               "rows": rows}
    (out / f"table_seed{s}.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    print("\n".join(md))
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
