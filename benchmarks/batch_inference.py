"""Sharded batch inference: 1 vs 2 worker processes on N synthetic images, and a run killed
halfway then resumed, which must write the same file as an uninterrupted run.

    python benchmarks/batch_inference.py [--images 2000] [--chunk 100] [--beams 1] [--new-tokens 16]

The tiny model is freshly built (random weights never emit EOS, so every caption runs to
`--new-tokens`: a fixed amount of work per image). One worker uses all cores as threads; two
workers split them. Wall time is the figure that counts; on a box shared with other work it
also measures the neighbours, so CPU seconds (workers included) are reported beside it.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ecomcap.config import DataConfig, GenerateConfig, ModelConfig, SynthConfig, TinyModelConfig  # noqa: E402
from ecomcap.data.prepare import prepare_data  # noqa: E402
from ecomcap.data.shards import read_table  # noqa: E402
from ecomcap.inference.batch import caption_dataset  # noqa: E402
from ecomcap.modeling.prepare import ensure_model  # noqa: E402


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="torch threads of the single worker (1 on an overloaded box: spinning OpenMP "
                         "threads collapse under contention)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    work = args.work
    prepare_data(DataConfig(work_dir=work / "data", splits=["train", "test"],
                            synth=SynthConfig(train=200, valid=0, test=args.images, seed=3)))
    model_cfg = ModelConfig(name_or_path=str(work / "tiny"), tiny=TinyModelConfig(), device="cpu")
    ensure_model(model_cfg, work / "data" / "train")
    test = work / "data" / "test"
    n = len(read_table(test, ["image_id"]))
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)

    def gen(workers: int) -> GenerateConfig:
        return GenerateConfig(num_beams=args.beams, max_new_tokens=args.new_tokens, batch_size=16,
                              chunks={"chunk_size": args.chunk, "workers": workers})

    res: dict = {"bench": "batch_inference", "images": n, "chunk": args.chunk, "beams": args.beams,
                 "new_tokens": args.new_tokens, "cpus": os.cpu_count(), "threads_1_worker": args.threads}
    outs = {}
    for workers in (1, 2):
        out = runs / f"w{workers}" / "caption_gen.jsonl"
        t0, c0 = time.perf_counter(), cpu_seconds()
        caption_dataset(model_cfg.name_or_path, model_cfg, test, out, gen(workers))
        secs, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        res[f"workers_{workers}_images_per_s"] = round(n / secs, 2)
        res[f"workers_{workers}_cpu_s"] = round(cpu, 1)
        outs[workers] = out.read_bytes()
        print(f"{workers} worker(s): {n / secs:.2f} images/s ({secs:.1f} s wall, {cpu:.1f} CPU-s, model load "
              "included)", flush=True)
    res["speedup_2_vs_1"] = round(res["workers_2_images_per_s"] / res["workers_1_images_per_s"], 2)
    res["identical_1_vs_2"] = outs[1] == outs[2]

    out = runs / "killed" / "caption_gen.jsonl"
    half = (n // args.chunk) // 2
    try:
        caption_dataset(model_cfg.name_or_path, model_cfg, test, out, gen(1), stop_after_chunks=half)
    except InterruptedError:
        print(f"killed after {half} chunks; resuming", flush=True)
    t0 = time.perf_counter()
    caption_dataset(model_cfg.name_or_path, model_cfg, test, out, gen(1))
    res["resume_s"] = round(time.perf_counter() - t0, 1)
    res["resumed_identical"] = out.read_bytes() == outs[1]
    ids = [json.loads(line)["image_id"] for line in outs[1].decode("utf-8").splitlines()]
    want = read_table(test, ["image_id"]).column(0).to_pylist()
    res["every_id_once"] = sorted(ids) == sorted(want) and len(set(ids)) == len(ids)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
