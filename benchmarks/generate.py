"""Batched vs one-by-one generation: images/s at batch 16 vs batch 1, captions must be identical.

    python benchmarks/generate.py [--model DIR] [--images 64] [--beams 5]

Uses the SFT model of `benchmarks/learning.py` when present (a trained model stops at EOS, as
production does), else a freshly built tiny model. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ecomcap.config import DataConfig, GenerateConfig, ModelConfig, SynthConfig, TinyModelConfig  # noqa: E402
from ecomcap.data.prepare import prepare_data  # noqa: E402
from ecomcap.inference.generate import caption_images  # noqa: E402
from ecomcap.modeling.load import load_trained  # noqa: E402
from ecomcap.modeling.prepare import ensure_model  # noqa: E402
from ecomcap.training.collate import PromptBuilder  # noqa: E402
from ecomcap.training.data import ShardImages  # noqa: E402

WORK = ROOT / ".run" / "bench_learning"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    prepare_data(DataConfig(work_dir=WORK / "data", synth=SynthConfig(train=2000, valid=200, test=0)))
    model_cfg = ModelConfig(name_or_path=str(WORK / "tiny"), tiny=TinyModelConfig())
    ensure_model(model_cfg, WORK / "data" / "train")
    model_dir = args.model or next((p for p in (WORK / "sft" / "best", WORK / "sft" / "model") if p.is_dir()),
                                   WORK / "tiny")
    model, processor = load_trained(model_dir, model_cfg)
    builder = PromptBuilder(processor, model_cfg.prompt)
    data = ShardImages(WORK / "data" / "valid")
    images = [data.image(i) for i in range(min(args.images, len(data)))]
    cfg = GenerateConfig(num_beams=args.beams, batch_size=args.batch)
    caption_images(model, builder, images[:2], cfg, progress=False)  # warm-up
    timings, captions = {}, {}
    for name, bs in (("one_by_one", 1), ("batched", args.batch)):
        t0 = time.perf_counter()
        captions[name] = caption_images(model, builder, images, cfg.model_copy(update={"batch_size": bs}))
        timings[name] = time.perf_counter() - t0
        print(f"{name:>10} (batch {bs:>2}): {len(images) / timings[name]:7.2f} images/s", flush=True)
    same = sum(a == b for a, b in zip(captions["one_by_one"], captions["batched"]))
    out = {
        "bench": "generate", "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "images": len(images), "beams": args.beams, "batch": args.batch,
        "images_per_s_one_by_one": round(len(images) / timings["one_by_one"], 2),
        "images_per_s_batched": round(len(images) / timings["batched"], 2),
        "speedup": round(timings["one_by_one"] / timings["batched"], 2),
        "identical_captions": f"{same}/{len(images)}",
        "sample": captions["batched"][:3],
    }
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
