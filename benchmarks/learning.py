"""Does the model really learn? Synthetic set, tiny Qwen2.5-VL, CPU, one run per stage.

    python benchmarks/learning.py --stage sft [--steps 900]
    python benchmarks/learning.py --stage scst [--scst-steps 150]   # starts from the SFT run above
    python benchmarks/learning.py --stage brand [--brand-epochs 20]  # freeze_llm brand recipe on top of it
    (--difficulty hard, --shift, --augment, --brand-min-images N, --seed S: the issue-22 comparisons)

Prints the validation figures before and after (production beam decoding), with wall time and
attribute accuracy; the last line is one JSON object:
{"stage": "sft"|"scst", "before": {...}, "after": {...}, "wall_s": N, "attr_before": x, "attr_after": y, ...}
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")

import torch  # noqa: E402

from ecomcap.config import (  # noqa: E402
    AugmentConfig,
    BrandBalanceConfig,
    DataConfig,
    FinetuneConfig,
    GenerateConfig,
    IngestConfig,
    ModelConfig,
    SCSTConfig,
    SFTConfig,
    SynthConfig,
    TinyModelConfig,
)
from ecomcap.data.prepare import brand_lexicon, prepare_data  # noqa: E402
from ecomcap.data.shards import read_references  # noqa: E402
from ecomcap.inference.batch import generate_for_dataset  # noqa: E402
from ecomcap.metrics.attributes import read_attributes  # noqa: E402
from ecomcap.metrics.brands import brand_counts, brands_from_references  # noqa: E402
from ecomcap.metrics.report import caption_report  # noqa: E402
from ecomcap.modeling.load import load_trained  # noqa: E402
from ecomcap.modeling.prepare import ensure_model  # noqa: E402

KEYS = ("CIDEr-D", "BLEU-4", "ROUGE-L")


def evaluate_model(model_dir: Path, work: Path, model_cfg: ModelConfig, gen: GenerateConfig, tag: str) -> dict:
    model, processor = load_trained(model_dir, model_cfg)
    t0 = time.perf_counter()
    preds = generate_for_dataset(model, processor, model_cfg.prompt, work / "data" / "valid",
                                 work / f"caption_gen_{tag}.jsonl", gen)
    train_attrs = read_attributes(work / "data" / "raw" / "attributes_train.jsonl")
    # training images per brand after ingest (and the brand filter): what training saw
    train_brands = brand_counts(brands_from_references(read_references(work / "data" / "train"), (), train_attrs))
    rep = caption_report(preds, read_references(work / "data" / "valid"),
                         read_attributes(work / "data" / "raw" / "attributes_valid.jsonl"), train_brands)
    rep["generate_s"] = round(time.perf_counter() - t0, 1)
    samples = list(preds.items())[:5]
    print(f"[{tag}] " + "  ".join(f"{k} {rep[k]:.4f}" for k in KEYS)
          + f"  attr {rep['attributes']['mean']:.3f}  distinct {rep['distinct']}  samples: {samples}", flush=True)
    return rep


def summary(stage: str, before: dict | None, after: dict, wall: float, extra: dict) -> dict:
    if before is None:
        out = summary(stage, after, after, wall, extra)
        return {k: v for k, v in out.items() if "before" not in k}
    return {
        "stage": stage,
        "before": {k: round(before[k], 4) for k in KEYS},
        "after": {k: round(after[k], 4) for k in KEYS},
        "wall_s": round(wall, 1),
        "attr_before": round(before["attributes"]["mean"], 4),
        "attr_after": round(after["attributes"]["mean"], 4),
        "attributes_before": {k: round(v, 4) for k, v in before["attributes"].items() if k != "n"},
        "attributes_after": {k: round(v, 4) for k, v in after["attributes"].items() if k != "n"},
        "distinct_before": before["distinct"], "distinct_after": after["distinct"],
        "repeat_ngram_before": round(before["repeat_ngram"], 4),
        "repeat_ngram_after": round(after["repeat_ngram"], 4),
        "mean_len_before": round(before["mean_len"], 2), "mean_len_after": round(after["mean_len"], 2),
        "brands_after": {k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in after["brands"].items() if k != "per_brand"},
        **extra,
    }


def stage_sft(args, work: Path, model_cfg: ModelConfig, gen: GenerateConfig) -> dict:
    from ecomcap.training.sft import run_sft

    # --no-before: the untrained model's figures (near zero; 40 never-ending tokens per beam) are skipped
    before = None if args.no_before else evaluate_model(work / "tiny", work, model_cfg, gen, f"{args.tag}before")
    sft_cfg = SFTConfig(output_dir=work / args.tag, max_steps=args.steps, lr=1e-3, batch_size=32,
                        eval_every=150, eval_images=args.valid, save_every=300, resume=False, seed=args.seed,
                        augment=AugmentConfig(enabled=args.augment, seed=args.seed))
    t0 = time.perf_counter()
    res = run_sft(work / "data" / "train", work / "data" / "valid", model_cfg,
                  FinetuneConfig(strategy="full"), sft_cfg, gen, brands=args.brands)
    wall = time.perf_counter() - t0
    curve = [(e["step"], round(e["CIDEr-D"], 3)) for e in res.evals]
    print("validation during training (greedy):", curve)
    after = evaluate_model(res.model_dir, work, model_cfg, gen, f"{args.tag}after")
    return summary("sft", before, after, wall, {"steps": res.steps, "val_curve": curve, "prompt": model_cfg.prompt,
                                                 "best_step": res.best_metrics["step"]})


def stage_scst(args, work: Path, model_cfg: ModelConfig, gen: GenerateConfig) -> dict:
    from ecomcap.training.identity import finished_output
    from ecomcap.training.scst import run_scst

    sft_dir = finished_output(work / args.tag)
    if sft_dir is None:
        raise SystemExit("run `benchmarks/learning.py --stage sft` first: SCST starts from its model")
    curve = [json.loads(line) for line in (sft_dir.parent / "metrics.jsonl").read_text().splitlines()]  # the run's
    curve = [(r["step"], round(r["val_CIDEr-D"], 3)) for r in curve if "val_CIDEr-D" in r]
    print("SFT validation curve (greedy):", curve)
    before = evaluate_model(sft_dir, work, model_cfg, gen, "sft")
    cfg = SCSTConfig(output_dir=work / "scst", max_steps=args.scst_steps, batch_size=args.scst_batch,
                     lr=args.scst_lr, samples=5, eval_every=max(args.scst_steps // 3, 1),
                     eval_images=args.valid, eval_beams=gen.num_beams, save_every=0, resume=False,
                     warmup_ratio=0.0, max_new_tokens=gen.max_new_tokens)
    t0 = time.perf_counter()
    res = run_scst(sft_dir, work / "data" / "train", work / "data" / "valid", model_cfg, cfg, gen)
    wall = time.perf_counter() - t0
    scst_curve = [(e["step"], round(e["CIDEr-D"], 3)) for e in res.evals]
    print("SCST validation curve (beam):", scst_curve)
    after = evaluate_model(res.model_dir, work, model_cfg, gen, "scst")
    return summary("scst", before, after, wall, {
        "steps": res.steps, "best_step": res.best_metrics["step"], "sft_val_curve": curve,
        "scst_val_curve": scst_curve,
        "cider_gain_rel": round(after["CIDEr-D"] / max(before["CIDEr-D"], 1e-9) - 1, 4),
    })


def stage_brand(args, work: Path, model_cfg: ModelConfig, gen: GenerateConfig) -> dict:
    """The freeze_llm brand recipe (configs/brand_freeze_llm.yaml) on top of the SFT run `--tag`: the
    LLM frozen (a pretrained LLM, as a real Qwen2.5-VL has), vision tower + merger trained, brand
    accuracy on validation after every epoch."""
    from ecomcap.training.identity import finished_output
    from ecomcap.training.sft import run_sft

    sft_dir = finished_output(work / args.tag)
    if sft_dir is None:
        raise SystemExit("run `benchmarks/learning.py --stage sft` first: the brand recipe starts from its model")
    start = model_cfg.model_copy(update={"name_or_path": str(sft_dir), "tiny": None})
    before = evaluate_model(sft_dir, work, model_cfg, gen, "brand_before")
    epoch = max(1, args.train // 32)
    cfg = SFTConfig(output_dir=work / "brand", max_steps=epoch * args.brand_epochs, lr=args.brand_lr, batch_size=32,
                    eval_every=epoch, eval_images=args.valid, save_every=0, resume=False, seed=args.seed,
                    warmup_ratio=0.0)
    t0 = time.perf_counter()
    res = run_sft(work / "data" / "train", work / "data" / "valid", start,
                  FinetuneConfig(strategy="freeze_llm", train_vision=True), cfg, gen, brands=args.brands)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (res.final_dir.parent / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"] // epoch, round(r.get("val_brand_micro", 0), 3), round(r.get("val_brand_macro", 0), 3),
              round(r["val_CIDEr-D"], 3)) for r in rows if "val_CIDEr-D" in r]
    print("per epoch (epoch, brand micro, brand macro, CIDEr-D; greedy, validation):", curve)
    after = evaluate_model(res.model_dir, work, model_cfg, gen, "brand_after")
    return summary("brand", before, after, wall, {"steps": res.steps, "best_step": res.best_metrics["step"],
                                                  "epoch_steps": epoch, "brand_curve": curve,
                                                  "brands_before": before["brands"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["sft", "scst", "brand"], default="sft")
    ap.add_argument("--brand-epochs", type=int, default=20)
    ap.add_argument("--brand-lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--scst-steps", type=int, default=150)
    ap.add_argument("--scst-batch", type=int, default=16)
    ap.add_argument("--scst-lr", type=float, default=5e-4)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--valid", type=int, default=200)
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_learning")
    ap.add_argument("--prompt", default=None, help="instruction (default: ModelConfig's); the tiny model's "
                    "vocabulary is built from the default prompt and the captions")
    ap.add_argument("--tag", default="sft", help="SFT output directory name under --work (runs side by side)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-before", action="store_true", help="sft: skip evaluating the untrained model")
    ap.add_argument("--difficulty", choices=("easy", "hard"), default="easy", help="data.synth.difficulty")
    ap.add_argument("--shift", action="store_true", help="hard set only: training images centred on a plain "
                    "ground at one scale, validation with the full variation (robustness, e.g. to augmentation)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (SFT order and init of the tiny model)")
    ap.add_argument("--augment", action="store_true", help="sft.augment.enabled (its default strengths)")
    ap.add_argument("--brand-min-images", type=int, default=0, help="ingest.brand_balance.min_images (0: off)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = args.work
    synth = SynthConfig(train=args.train, valid=args.valid, test=0, difficulty=args.difficulty, shift=args.shift)
    ingest = IngestConfig(brand_balance=BrandBalanceConfig(min_images=args.brand_min_images))
    data_cfg = DataConfig(work_dir=work / "data", synth=synth, ingest=ingest)
    prepare_data(data_cfg)
    model_cfg = ModelConfig(name_or_path=str(work / "tiny"), tiny=TinyModelConfig(seed=args.seed))
    ensure_model(model_cfg, work / "data" / "train")
    if args.prompt:
        model_cfg = model_cfg.model_copy(update={"prompt": args.prompt})
    gen = GenerateConfig()  # production decoding: beam 5
    args.brands = brand_lexicon(data_cfg)
    stage = {"sft": stage_sft, "scst": stage_scst, "brand": stage_brand}[args.stage]
    out = stage(args, work, model_cfg, gen)
    out.update(difficulty=args.difficulty, shift=args.shift, seed=args.seed, augment=args.augment,
               brand_min_images=args.brand_min_images)
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
