"""Decoding length from the data vs a fixed max_new_tokens: images/s and whether captions change.

    python benchmarks/decode_length.py --work .run/bench_learning [--tag sft] [--images 200] [--repeats 2]

Two models on the validation images of a `benchmarks/learning.py` work directory, beam 5, batch 16:
- trained: the SFT model of `--tag` (it stops at EOS; the length it recorded at export);
- untrained: the tiny model it started from (it never stops: the limit is every caption's length;
  the data's length counted on the training references with its tokenizer).
Each is timed with max_new_tokens 40 (the old fixed default) and with the data's length,
alternating A B A B in one process on one thread set. Captions (raw, no clean-up) are compared
where the fixed-length caption fits (it ended before either limit: fewer tokens than both, EOS
included) and over all images. Last line: one JSON object.
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

from ecomcap.config import GenerateConfig, ModelConfig, PostprocessConfig  # noqa: E402
from ecomcap.data.lengths import decode_length, reference_lengths  # noqa: E402
from ecomcap.inference.generate import caption_images  # noqa: E402
from ecomcap.modeling.load import load_trained, read_output_marker  # noqa: E402
from ecomcap.training.collate import PromptBuilder  # noqa: E402
from ecomcap.training.data import ShardImages  # noqa: E402
from ecomcap.training.identity import finished_output  # noqa: E402

FIXED = 40


def timed(model, builder, images, new_tokens: int, repeats: int) -> tuple[list[str], float]:
    # raw captions (no clean-up): their token count says whether a caption ended or was cut
    cfg = GenerateConfig(num_beams=5, batch_size=16, max_new_tokens=new_tokens,
                         postprocess=PostprocessConfig(strip=False, collapse_repeats=False, normalize_width=False))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        caps = caption_images(model, builder, images, cfg, progress=False)
        best = min(best, time.perf_counter() - t0)
    return caps, best


def compare(name: str, model_dir: Path, data_len: int, images, args) -> dict:
    model, processor = load_trained(model_dir, ModelConfig(name_or_path=str(model_dir)))
    builder = PromptBuilder(processor, ModelConfig().prompt)
    tok = processor.tokenizer
    fixed = data = None
    t_fixed = t_data = float("inf")
    for _ in range(args.repeats):  # A B A B: drift on the box hits both alike
        fixed, t = timed(model, builder, images, FIXED, 1)
        t_fixed = min(t_fixed, t)
        data, t = timed(model, builder, images, data_len, 1)
        t_data = min(t_data, t)
    lens = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in fixed]
    fits = [i for i, n in enumerate(lens) if n < min(FIXED, data_len) - 1]  # ended (EOS) under both limits
    row = {"model": name, "max_new_tokens_data": data_len, "images": len(images),
           "images_per_s_fixed40": round(len(images) / t_fixed, 2), "images_per_s_data": round(len(images) / t_data, 2),
           "speedup": round(t_fixed / t_data, 3), "fits": len(fits),
           "unchanged_where_fits": sum(fixed[i] == data[i] for i in fits),
           "unchanged_all": sum(a == b for a, b in zip(fixed, data)),
           "mean_tokens_fixed40": round(sum(lens) / len(lens), 2)}
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_learning")
    ap.add_argument("--tag", default="sft")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trained = finished_output(args.work / args.tag)
    if trained is None:
        raise SystemExit(f"no finished SFT run under {args.work / args.tag}: run benchmarks/learning.py first")
    valid = ShardImages(args.work / "data" / "valid")
    images = [valid.image(i) for i in range(min(args.images, len(valid)))]
    recorded = (read_output_marker(trained) or {}).get("max_new_tokens")  # None: exported before it was recorded
    untrained_dir = args.work / "tiny"
    from ecomcap.modeling.processor import load_processor

    tok = load_processor(untrained_dir).tokenizer
    data_len = decode_length(args.work / "data" / "train", tok)
    stats = reference_lengths(args.work / "data" / "train", tok)  # (cached by the line above)
    rows = [compare("trained", trained, recorded or data_len, images, args),
            compare("untrained", untrained_dir, data_len, images, args)]
    print(json.dumps({"reference_tokens": {k: stats[k] for k in ("p99", "max", "mean", "n")},
                      "recorded_by_sft": recorded, "rows": rows, "threads": args.threads}, ensure_ascii=False))


if __name__ == "__main__":
    main()
