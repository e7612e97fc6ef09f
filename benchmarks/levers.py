"""One CPU row per lever of the GPU path, on the full-width Qwen2.5-VL-3B cut to 2 language and 2
vision layers (random weights, hub layout, the real vocabulary): each variant in a fresh process,
so its peak RSS is its own. Levers, each against the reference measured in the same run:

- loss: the whole batch's vocabulary logits vs the chunked answer-only cross-entropy (SFT step);
- patch_embed: the stock Conv3d vs the matmul (vision tower forward);
- decode: the shipped penalties (beam 5, repetition 1.2, no-repeat 3-grams) on stock `generate`
  vs the own loop (EOS suppressed: both decode every step);
- data: the SFT step with micro-batches built inline vs by 2 DataLoader workers;
- packing: the SFT step on images of very different sizes, left-padded vs packed padding-free.

    python benchmarks/levers.py [--batch 4] [--steps 2]     # last line: one JSON object

tokens/s counts the tokens a variant processes (prompt + answer for SFT, images' patches for the
vision tower, generated tokens for decoding); cpu_s is the process's user + system time of the
measured part, its finished children's (DataLoader workers) included; peak RSS is the process's own
and, apart, its largest child's. On a 2-core box the DataLoader's workers share the cores with the
step.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LEVERS = {"loss": ("full_logits", "chunked"), "patch_embed": ("conv3d", "matmul"),
          "decode": ("hf_generate", "own_loop"), "data": ("inline", "workers2"), "packing": ("padded", "packed")}
MIXED = [(448, 448), (112, 224), (224, 112), (448, 224)]  # the packing lever's images: very different token counts


def _cpu() -> float:
    """User + system seconds of this process and of its finished children (DataLoader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def one(lever: str, variant: str, path: str, args) -> dict:
    import torch
    from gpu_peer import PROMPT, _batch, _decode_kw, pairs

    from ecomcap.config import FinetuneConfig, ModelConfig
    from ecomcap.inference.decode import generate
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.strategies import apply_strategy
    from ecomcap.training.answer_loss import answer_loss
    from ecomcap.training.collate import PromptBuilder
    from ecomcap.training.microbatches import MicroBatches, micro_batches

    torch.manual_seed(0)
    # the packing lever lets image sizes (token counts) differ: a pixel floor below its smallest image
    cfg = ModelConfig(name_or_path=path, device="cpu", dtype="float32",
                      min_pixels=112 * 112 if lever == "packing" else 448 * 448, max_pixels=448 * 448,
                      patch_embed="conv" if variant == "conv3d" else "matmul")
    model, processor = load_base(cfg)
    builder = PromptBuilder(processor, PROMPT)
    data = pairs(args.batch * args.steps, 0.5, seed=0)
    if lever == "packing":
        from PIL import Image

        data = [(Image.new("RGB", MIXED[i % len(MIXED)], (40 * i % 255, 90, 160)), c) for i, (_, c) in enumerate(data)]
    tokens = 0
    if lever in ("loss", "data", "packing"):
        model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=16))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        batches = micro_batches(MicroBatches(lambda s, m: data[s * args.batch:(s + 1) * args.batch],
                                             lambda chunk: _batch(builder, chunk), 1,
                                             args.steps), 0, 2 if variant == "workers2" else 0, pin=False)
        t0, c0 = time.perf_counter(), _cpu()
        for batch in batches:
            loss = answer_loss(model, batch, 0.0, 0 if variant == "full_logits" else 1024, packed=variant == "packed")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch.inputs["attention_mask"].sum())
    elif lever == "patch_embed":
        enc = builder.prompts([im for im, _ in data[: args.batch]])
        t0, c0 = time.perf_counter(), _cpu()
        with torch.no_grad():
            for _ in range(args.steps):
                model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
                tokens += int(enc["image_grid_thw"].prod(-1).sum())
    else:
        enc = builder.prompts([im for im, _ in data[: args.batch]])
        kw = _decode_kw(builder, 5, True, args.new_tokens)
        t0, c0 = time.perf_counter(), _cpu()
        with torch.no_grad():
            out = generate(model, enc, "hf" if variant == "hf_generate" else "once",
                           penalty_scope="prompt" if variant == "hf_generate" else "generated", **kw)
        tokens = (out.shape[1] - enc["input_ids"].shape[1]) * args.batch
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"lever": lever, "variant": variant, "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "children_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--levers", nargs="+", default=list(LEVERS))
    ap.add_argument("--one", nargs=3, metavar=("LEVER", "VARIANT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args)), flush=True)
        return
    from ecomcap.modeling.hubfixture import QWEN25_VL_3B, build_hub_checkpoint

    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_hub_checkpoint(Path(tmp) / "qwen25vl3b-2layers", QWEN25_VL_3B.reduced(num_hidden_layers=2,
                                                                                          vision_depth=2))
        for lever in args.levers:
            for variant in LEVERS[lever]:
                cmd = [sys.executable, __file__, "--one", lever, variant, str(path), "--batch", str(args.batch),
                       "--steps", str(args.steps), "--new-tokens", str(args.new_tokens)]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
                if res.returncode != 0:
                    raise SystemExit(f"{lever}/{variant} failed:\n{res.stderr[-3000:]}")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    for lever, (ref, alt) in LEVERS.items():
        a = next((r for r in rows if r["lever"] == lever and r["variant"] == ref), None)
        b = next((r for r in rows if r["lever"] == lever and r["variant"] == alt), None)
        if a and b:
            ratios[lever] = {"speed_x": round(b["tokens_per_s"] / a["tokens_per_s"], 2),
                             "cpu_s_x": round(b["cpu_s"] / a["cpu_s"], 2),
                             "peak_rss_gib_delta": round(b["peak_rss_gib"] - a["peak_rss_gib"], 2)}
    print(json.dumps({"bench": "levers", "model": "Qwen2.5-VL-3B width, 2+2 layers, random", "batch": args.batch,
                      "steps": args.steps, "wall_s": round(time.perf_counter() - started, 1), "ratios": ratios,
                      "rows": rows}))


if __name__ == "__main__":
    main()
