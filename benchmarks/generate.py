"""Generation speed: stock (HF-expanded) batched vs prefill-once batched vs one by one, and the
SCST rollout, with identical outputs required. One run, ratios measured within the run.

    python benchmarks/generate.py [--scales tiny,real_width] [--images 16] [--batch 16] [--beams 5]

Scales:
- tiny: the SFT model of `benchmarks/learning.py` when present (a trained model stops at EOS,
  as production does), else a freshly built tiny model; 112 px images (16 image tokens).
- real_width: Qwen2.5-VL-3B widths (text hidden 2048, 16 heads / 2 KV heads, MLP 11008, vocab
  151,936; vision hidden 1280, MLP 3420, 16 heads) at reduced depth (`--rw-layers`,
  `--rw-vision-depth`), random weights built from `Qwen2_5_VLConfig`, 448x448 images (256 image
  tokens each), a fixed caption length (`--rw-new-tokens`: random weights never emit EOS);
  outputs compared as token ids.

Reports images/s of wall time and images per CPU-second of this process (`--threads 1` on a
shared, overloaded box: wall time there measures the neighbours, CPU time the work).

Per scale: beam search (`--beams`) one by one (batch 1, stock path), batched stock and batched
prefill-once (the fast path: prompt prefilled once per image, `ecomcap.inference.beam`'s decode
loop, patch embedding as one matmul in its prefill); greedy one by one and batched (greedy
expands nothing: the fast path is the stock call there). `--ablate` adds the
fast path without its decode loop (continuing `generate` from the expanded cache) and without
the matmul, to show what each part gives, and the stock path given the same matmul patch
embedding (`speedup_vs_hf_matmul_cpu`: the fast path against that). Tiny scale also: the SCST
rollout (K samples per image, sampling, fixed seed),
stock vs prefill-once. Last line: one JSON object, per scale `speedup_vs_batched` (prefill-once
vs stock batched beam search), `identical` (token ids) and `beam_rows_differing`. On a GPU in bf16
(`--device cuda --dtype bfloat16 --tolerance 0.05`) near-tied beams may swap: `within_tolerance`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ecomcap.config import DataConfig, GenerateConfig, ModelConfig, SynthConfig, TinyModelConfig  # noqa: E402
from ecomcap.data.prepare import prepare_data  # noqa: E402
from ecomcap.inference.decode import generate  # noqa: E402
from ecomcap.inference.generate import generate_kwargs, model_device_dtype  # noqa: E402
from ecomcap.modeling.load import load_trained  # noqa: E402
from ecomcap.modeling.patch_embed import patch_embed_as_matmul  # noqa: E402
from ecomcap.modeling.prepare import ensure_model  # noqa: E402
from ecomcap.training.collate import PromptBuilder  # noqa: E402
from ecomcap.training.data import ShardImages  # noqa: E402

WORK = ROOT / ".run" / "bench_learning"


def tails(out: torch.Tensor, prompt_len: int, eos: int) -> list[tuple[int, ...]]:
    """Generated ids per row, cut after EOS (padding after it differs in length only)."""
    rows = []
    for r in out[:, prompt_len:].tolist():
        rows.append(tuple(r[: r.index(eos) + 1] if eos in r else r))
    return rows


@torch.no_grad()
def run(model, builder: PromptBuilder, images: list, cfg: GenerateConfig, **extra) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds of this process, generated ids) over `images` in batches of
    `cfg.batch_size`. CPU seconds are what a shared, overloaded box cannot distort (with one
    thread they are the work done); wall seconds are what a quiet machine would show."""
    device, dtype = model_device_dtype(model)
    kw = {**generate_kwargs(cfg, builder), **extra}
    ids: list = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(images), cfg.batch_size):
        enc = builder.prompts(images[i : i + cfg.batch_size])
        enc = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in enc.items()}
        if "seed" in extra:
            torch.manual_seed(extra["seed"] + i)
        out = generate(model, enc, cfg.prefill, **{k: v for k, v in kw.items() if k != "seed"})
        ids += tails(out, enc["input_ids"].shape[1], builder.eos_id)
    return time.perf_counter() - t0, time.process_time() - c0, ids


def tiny_scale(n_images: int):
    prepare_data(DataConfig(work_dir=WORK / "data", synth=SynthConfig(train=2000, valid=200, test=0)))
    # the stock conv patch embedding: each mode below says whether it runs the matmul
    model_cfg = ModelConfig(name_or_path=str(WORK / "tiny"), tiny=TinyModelConfig(), patch_embed="conv")
    ensure_model(model_cfg, WORK / "data" / "train")
    model_dir = next((p for p in (WORK / "sft" / "best", WORK / "sft" / "model") if p.is_dir()), WORK / "tiny")
    model, processor = load_trained(model_dir, model_cfg)
    data = ShardImages(WORK / "data" / "valid")
    images = [data.image(i) for i in range(min(n_images, len(data)))]
    return model, PromptBuilder(processor, model_cfg.prompt), images, str(model_dir.relative_to(ROOT)), None


def real_width_scale(n_images: int, layers: int, vision_depth: int):
    """Qwen2.5-VL-3B widths, reduced depth, random weights; the tiny char tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ecomcap.modeling.processor import ImageOnlyQwenProcessor
    from ecomcap.modeling.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer(["请为这张电商商品图生成中文描述，突出品类、颜色、图案和品牌。红色条纹连衣裙"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[vision_depth - 1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    side = 448  # 32 x 32 patches of 14 px -> 16 x 16 merged = 256 image tokens
    ip = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    processor = ImageOnlyQwenProcessor(ip, tok, chat_template=CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n_images)]
    n_params = sum(p.numel() for p in model.parameters())
    return model, PromptBuilder(processor, ModelConfig().prompt), images, f"qwen2.5-vl-3b-width random ({n_params / 1e6:.0f}M params)", n_params


def differing_share(a: list, b: list) -> float:
    """Share of rows whose generated ids differ (bf16 on a GPU: the last prompt token is computed in
    its own one-token forward under prefill-once, so near-tied beams can swap)."""
    return sum(x != y for x, y in zip(a, b, strict=True)) / max(1, len(a))


@contextlib.contextmanager
def ablated(model, loop: bool, matmul: bool):
    """The fast path with parts switched off: `loop=False` continues `generate` from the expanded
    cache (the first prefill-once version), `matmul=False` keeps the patch embedding's Conv3d
    (the product runs the matmul for the model's lifetime: `model.patch_embed`)."""
    from ecomcap.inference import beam

    saved = beam.plan
    if not loop:
        beam.plan = lambda *a, **k: None
    try:
        with patch_embed_as_matmul(model) if matmul else contextlib.nullcontext():
            yield
    finally:
        beam.plan = saved


def bench_scale(name, model, builder, images, base: GenerateConfig, batch: int, beams: int,
                only_batched_beams: bool = False, tolerance: float = 0.0, ablate: bool = False) -> dict:
    modes = {
        f"beam{beams}_one_by_one": base.model_copy(update={"num_beams": beams, "batch_size": 1, "prefill": "hf"}),
        f"beam{beams}_batched_hf": base.model_copy(update={"num_beams": beams, "batch_size": batch, "prefill": "hf"}),
        f"beam{beams}_batched_prefill_once": base.model_copy(update={"num_beams": beams, "batch_size": batch,
                                                                     "prefill": "once"}),
        "greedy_one_by_one": base.model_copy(update={"num_beams": 1, "batch_size": 1}),
        "greedy_batched": base.model_copy(update={"num_beams": 1, "batch_size": batch}),
    }
    if only_batched_beams:  # the headline pair only (deeper real-width models take long on a CPU)
        modes = {m: c for m, c in modes.items() if m.startswith(f"beam{beams}_batched")}
    # the fast path runs the matmul patch embedding; ablations: what each part of it gives, and the
    # stock path given the matmul too
    parts = {m: (lambda: patch_embed_as_matmul(model)) for m in modes if m.endswith("prefill_once")}
    if ablate:
        once_cfg, hf_cfg = modes[f"beam{beams}_batched_prefill_once"], modes[f"beam{beams}_batched_hf"]
        for mode, cfg, ctx in (("once_generate_decode_conv", once_cfg, lambda: ablated(model, False, False)),
                               ("once_loop_conv", once_cfg, lambda: ablated(model, True, False)),
                               ("hf_matmul", hf_cfg, lambda: patch_embed_as_matmul(model))):
            modes[f"beam{beams}_batched_{mode}"], parts[f"beam{beams}_batched_{mode}"] = cfg, ctx
    run(model, builder, images[:2], modes[f"beam{beams}_batched_prefill_once"])  # warm-up
    res, cpu, ids = {}, {}, {}
    for mode, cfg in modes.items():
        with parts.get(mode, contextlib.nullcontext)():
            secs, cpu_s, ids[mode] = run(model, builder, images, cfg)
        res[mode], cpu[mode] = round(len(images) / secs, 3), round(len(images) / cpu_s, 3)
        print(f"[{name}] {mode:>28}: {res[mode]:8.3f} images/s wall ({secs:.1f} s), "
              f"{cpu[mode]:8.3f} images per CPU-s ({cpu_s:.1f} CPU-s)", flush=True)
    beam_modes = [m for m in modes if m.startswith("beam")]
    same_beam = all(ids[m] == ids[beam_modes[0]] for m in beam_modes)
    differ = max(differing_share(ids[m], ids[beam_modes[0]]) for m in beam_modes)
    same_greedy = only_batched_beams or ids["greedy_one_by_one"] == ids["greedy_batched"]
    once, hf, single = f"beam{beams}_batched_prefill_once", f"beam{beams}_batched_hf", f"beam{beams}_one_by_one"
    out = {"images_per_s": res, "images_per_cpu_s": cpu,
           "speedup_vs_batched": round(res[once] / res[hf], 2),
           "speedup_vs_batched_cpu": round(cpu[once] / cpu[hf], 2),
           "identical": same_beam and same_greedy,
           "beam_rows_differing": round(differ, 4),  # worst mode vs beam one by one
           "rows_differing_once_vs_hf_batched": round(differing_share(ids[once], ids[hf]), 4),
           "within_tolerance": differ <= tolerance and (same_greedy or tolerance > 0),
           "mean_new_tokens": round(float(np.mean([len(r) for r in ids[beam_modes[0]]])), 1)}
    for mode in parts:
        out[f"speedup_{mode.split('_batched_')[1]}_vs_batched_cpu"] = round(cpu[mode] / cpu[hf], 2)
    if parts:  # the fast path against a stock path that has the matmul patch embedding as well
        out["speedup_vs_hf_matmul_cpu"] = round(cpu[once] / cpu[f"beam{beams}_batched_hf_matmul"], 2)
    if not only_batched_beams:
        out.update(speedup_vs_one_by_one=round(res[once] / res[single], 2),
                   hf_batched_vs_one_by_one=round(res[hf] / res[single], 2),
                   greedy_batched_vs_one_by_one=round(res["greedy_batched"] / res["greedy_one_by_one"], 2))
    print(f"[{name}] prefill-once vs stock batched: {out['speedup_vs_batched']}x, identical: {out['identical']}",
          flush=True)
    return out


def bench_scst_rollout(model, builder, images, batch: int, k: int, new_tokens: int) -> dict:
    """Sampling K captions per image as an SCST step does (batch of `batch` images)."""
    base = GenerateConfig(num_beams=1, do_sample=True, temperature=1.0, max_new_tokens=new_tokens, batch_size=batch)
    out, ids = {}, {}
    steps = max(1, len(images) // batch)
    for mode in ("hf", "once"):
        secs, cpu_s, ids[mode] = run(model, builder, images, base.model_copy(update={"prefill": mode}),
                                     num_return_sequences=k, seed=123)
        out[f"s_per_step_{mode}"], out[f"cpu_s_per_step_{mode}"] = round(secs / steps, 3), round(cpu_s / steps, 3)
        print(f"[scst rollout] {mode:>4}: {secs / steps:.3f} s per step wall, {cpu_s / steps:.3f} CPU-s "
              f"({batch} images x {k} samples)", flush=True)
    out["speedup"] = round(out["s_per_step_hf"] / out["s_per_step_once"], 2)
    out["speedup_cpu"] = round(out["cpu_s_per_step_hf"] / out["cpu_s_per_step_once"], 2)
    out["identical"] = ids["hf"] == ids["once"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="tiny,real_width")
    ap.add_argument("--images", type=int, default=64, help="tiny scale")
    ap.add_argument("--rw-images", type=int, default=16, help="real-width scale")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--rw-layers", type=int, default=1)
    ap.add_argument("--rw-vision-depth", type=int, default=1)
    ap.add_argument("--rw-new-tokens", type=int, default=24)
    ap.add_argument("--scst-samples", type=int, default=5)
    ap.add_argument("--only-batched-beams", action="store_true", help="time stock vs prefill-once batched only")
    ap.add_argument("--ablate", action="store_true",
                    help="also time the fast path without its decode loop / patch-embedding matmul")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="torch threads; 1 makes CPU seconds the work done (shared boxes)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU run: with --dtype bfloat16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="share of beam rows allowed to differ between modes (GPU bf16 near-ties); "
                         "0 = token ids identical (fp32 CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"bench": "generate", "batch": args.batch, "beams": args.beams, "threads": torch.get_num_threads(),
                    "device": args.device, "dtype": args.dtype, "tolerance": args.tolerance}
    for scale in args.scales.split(","):
        if scale == "tiny":
            model, builder, images, label, _ = tiny_scale(args.images)
            base = GenerateConfig()
        else:
            model, builder, images, label, _ = real_width_scale(args.rw_images, args.rw_layers, args.rw_vision_depth)
            base = GenerateConfig(max_new_tokens=args.rw_new_tokens)
        model = model.to(args.device, dtype=getattr(torch, args.dtype))
        print(f"[{scale}] {label}: {len(images)} images, prompt {builder.prompts(images[:1])['input_ids'].shape[1]} tokens",
              flush=True)
        result[scale] = {"model": label, "images": len(images),
                         **bench_scale(scale, model, builder, images, base, args.batch, args.beams,
                                       args.only_batched_beams, args.tolerance, args.ablate)}
        if scale == "tiny" and not args.only_batched_beams:
            result["scst_rollout_tiny"] = bench_scst_rollout(model, builder, images, args.batch, args.scst_samples,
                                                             40)
        del model
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
