"""Does the model really learn? Synthetic set, tiny Qwen2.5-VL, CPU, one run per stage.

    python benchmarks/learning.py --stage sft [--steps 900]

Prints the validation figures before and after (production beam decoding), with wall time and
attribute accuracy; the last line is one JSON object:
{"stage": "sft", "before": {...}, "after": {...}, "wall_s": N, "attr_before": x, "attr_after": y}
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
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")

import torch  # noqa: E402

from ecomcap.config import (  # noqa: E402
    DataConfig, FinetuneConfig, GenerateConfig, ModelConfig, SFTConfig, SynthConfig, TinyModelConfig,
)
from ecomcap.data.prepare import prepare_data  # noqa: E402
from ecomcap.data.shards import read_references  # noqa: E402
from ecomcap.inference.generate import generate_for_dataset  # noqa: E402
from ecomcap.metrics.attributes import read_attributes  # noqa: E402
from ecomcap.metrics.report import caption_report  # noqa: E402
from ecomcap.modeling.load import load_trained  # noqa: E402
from ecomcap.modeling.prepare import ensure_model  # noqa: E402

KEYS = ("CIDEr-D", "BLEU-4", "ROUGE-L")


def evaluate_model(model_dir: Path, work: Path, model_cfg: ModelConfig, gen: GenerateConfig, tag: str) -> dict:
    model, processor = load_trained(model_dir, model_cfg)
    t0 = time.perf_counter()
    preds = generate_for_dataset(model, processor, model_cfg.prompt, work / "data" / "valid",
                                 work / f"caption_gen_{tag}.jsonl", gen)
    rep = caption_report(preds, read_references(work / "data" / "valid"),
                         read_attributes(work / "data" / "raw" / "attributes_valid.jsonl"))
    rep["generate_s"] = round(time.perf_counter() - t0, 1)
    samples = list(preds.items())[:5]
    print(f"[{tag}] " + "  ".join(f"{k} {rep[k]:.4f}" for k in KEYS)
          + f"  attr {rep['attributes']['mean']:.3f}  distinct {rep['distinct']}  samples: {samples}", flush=True)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["sft"], default="sft")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--valid", type=int, default=200)
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_learning")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    work = args.work
    data_cfg = DataConfig(work_dir=work / "data", synth=SynthConfig(train=args.train, valid=args.valid, test=0))
    prepare_data(data_cfg)
    model_cfg = ModelConfig(name_or_path=str(work / "tiny"), tiny=TinyModelConfig())
    ensure_model(model_cfg, work / "data" / "train")
    gen = GenerateConfig()  # production decoding: beam 5
    before = evaluate_model(work / "tiny", work, model_cfg, gen, "before")

    from ecomcap.training.sft import run_sft

    sft_cfg = SFTConfig(output_dir=work / "sft", max_steps=args.steps, lr=1e-3, batch_size=32,
                        eval_every=150, eval_images=args.valid, save_every=300, resume=False)
    t0 = time.perf_counter()
    res = run_sft(work / "data" / "train", work / "data" / "valid", model_cfg,
                  FinetuneConfig(strategy="full"), sft_cfg, gen)
    wall = time.perf_counter() - t0
    print("validation during training (greedy):", [(e["step"], round(e["CIDEr-D"], 3)) for e in res.evals])
    after = evaluate_model(res.model_dir, work, model_cfg, gen, "after")
    out = {
        "stage": "sft",
        "before": {k: round(before[k], 4) for k in KEYS},
        "after": {k: round(after[k], 4) for k in KEYS},
        "wall_s": round(wall, 1),
        "steps": res.steps,
        "best_step": res.best_metrics["step"] if res.best_metrics else None,
        "attr_before": round(before["attributes"]["mean"], 4),
        "attr_after": round(after["attributes"]["mean"], 4),
        "attributes_after": {k: round(v, 4) for k, v in after["attributes"].items() if k != "n"},
        "distinct_after": after["distinct"],
        "repeat_ngram_after": round(after["repeat_ngram"], 4),
    }
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
