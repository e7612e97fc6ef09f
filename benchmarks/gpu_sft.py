"""The real-size Qwen2.5-VL-3B on one GPU: SFT (LoRA), one SCST step and batched beam search,
through the same path as a downloaded checkpoint.

A hub-layout directory of the full 3B (random bf16 weights, the real Qwen2.5 tokenizer, the
release's config/chat template/preprocessor/generation config; `ecomcap.modeling.hubfixture`)
is written, then loaded with `ecomcap.modeling.load.load_base` exactly like
`Qwen/Qwen2.5-VL-3B-Instruct`, with the sizes of configs/qwen25vl_3b_lora.yaml (max_pixels
401408: up to 512 image tokens; photos of mixed aspect ratios). Prints per stage: samples/s,
peak GPU memory, and for SFT the MFU counting matmul FLOPs only (embeddings are lookups; the
frozen vision tower runs forward only). The SCST step is timed with the GPU-sized log-prob pass
(images encoded once, `logprob_chunk` sequences per backward) and, for comparison, the old
one-forward pass (which may not fit: reported as OOM). Compare the peaks with
benchmarks/memory.py's extrapolation.

    python benchmarks/gpu_sft.py [--steps 10] [--smoke]   # --smoke: tiny width on CPU (code check)

Runs only on a CUDA machine (target: under 8 minutes on one H100/H200; not yet measured); elsewhere it prints a 'skipped'
JSON and exits 0. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SIZES = [(448, 896), (896, 448), (640, 640), (560, 700), (720, 540), (616, 616), (504, 784), (784, 504)]
CAPTION = "这款连衣裙采用优质面料，版型修身显瘦，V领设计优雅大方，碎花图案清新甜美，适合春夏季节穿着。"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def images(n: int, scale: float):
    from PIL import Image

    return [Image.new("RGB", (max(28, int(w * scale)), max(28, int(h * scale))), (37 * i % 255, 90, 160))
            for i, (w, h) in enumerate(SIZES[i % len(SIZES)] for i in range(n))]


def matmul_flops(cfg, enc, answer_len: int, backward: bool) -> float:
    """Matmul FLOPs of one teacher-forced step over `enc` (a batch with its answers appended:
    the attention mask already counts the answer tokens). Backward of the frozen language model
    is the input gradient only: 1x forward for the projections and the head, 2x for attention
    (dQ and dK from QK^T, dP and dV from PV). The frozen vision tower runs forward only.
    Embeddings are lookups."""
    t, v = cfg.text_config, cfg.vision_config
    h, i, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    lens = enc["attention_mask"].sum(-1).float()
    per_token = 2 * L * (2 * h * h + 2 * h * kv + 3 * h * i)
    linear = float((per_token * lens).sum())
    linear += 2 * h * t.vocab_size * (answer_len + 1) * len(lens)  # head on the answer positions only
    attention = float((2 * 2 * L * h * lens * lens / 2).sum())  # causal QK^T and PV
    patches = float(enc["image_grid_thw"].prod(-1).sum())
    vh, vi = v.hidden_size, v.intermediate_size
    vision = patches * 2 * (1176 * vh + v.depth * (4 * vh * vh + 3 * vh * vi))
    vision += patches / 4 * 2 * (4 * vh * 4 * vh + 4 * vh * v.out_hidden_size)  # merger MLP
    if backward:
        return linear * 2 + attention * 3 + vision
    return linear + attention + vision


def load(tmp: Path, smoke: bool, device):
    from ecomcap.config import ModelConfig
    from ecomcap.modeling.hubfixture import QWEN25_VL_3B, TEST_ARCH, build_hub_checkpoint
    from ecomcap.modeling.load import load_base

    t0 = time.perf_counter()
    path = build_hub_checkpoint(tmp / "Qwen2.5-VL-3B-Instruct-random", TEST_ARCH if smoke else QWEN25_VL_3B)
    built = time.perf_counter() - t0
    cfg = ModelConfig(name_or_path=str(path), device=device.type, dtype="bfloat16",
                      min_pixels=200704, max_pixels=401408)
    model, processor = load_base(cfg)
    print(f"built the hub-layout checkpoint in {built:.0f} s, loaded in {time.perf_counter() - t0 - built:.0f} s",
          flush=True)
    return model, processor


def timed_sft_steps(model, args, device, batch_at, loss_of, lr: float = 1e-5):
    """Mean seconds of an SFT step (forward, backward, clip, AdamW) over `args.steps` after
    `args.warmup`, and the last loss; `batch_at(step)` gives the step's batch (timed with it)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=device.type == "cuda")
    reset_peak(device)
    times = []
    model.train()
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        batch = batch_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times), loss


def achieved(model, batch, step_s: float) -> tuple[float, float | None]:
    """(matmul TFLOP/s of an SFT step over `batch`, MFU against the card's bf16 peak, if known)."""
    tflops = matmul_flops(model.config, batch.inputs, batch.answer_len, backward=True) / step_s / 1e12
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return tflops, (round(tflops / peak, 4) if peak else None)


def sft(model, builder, args, device) -> dict:
    from ecomcap.training.answer_loss import answer_loss
    from ecomcap.training.collate import with_answers

    ims = images(args.batch, args.scale)
    batch = with_answers(builder.prompts(ims), builder.answer_ids([CAPTION * 2] * args.batch, 64),
                         builder.pad_id).to(device)
    step_s, loss = timed_sft_steps(model, args, device, lambda step: batch,
                                   lambda m, b: answer_loss(m, b, 0.1))
    tflops, mfu = achieved(model, batch, step_s)
    return {"stage": "sft_lora", "batch": args.batch, "samples_per_s": round(args.batch / step_s, 2),
            "step_s": round(step_s, 3), "peak_mem_gib": peak_gib(device), "matmul_tflops": round(tflops, 1),
            "mfu": mfu, "seq_len": int(batch.inputs["input_ids"].shape[1]),
            "loss": round(float(loss.detach()), 4)}


def scst(model, builder, args, device) -> list[dict]:
    from ecomcap.config import GenerateConfig
    from ecomcap.inference.generate import generate_kwargs
    from ecomcap.modeling.processor import suppressed_token_ids
    from ecomcap.training.collate import answer_logits, with_answers
    from ecomcap.training.logprob import PolicyLogprob
    from ecomcap.training.losses import scst_loss, sequence_logprob, token_logprobs
    from ecomcap.training.scst import repeat_prompts, split_samples

    k, b = args.samples, args.scst_batch
    enc = {key: v.to(device) for key, v in builder.prompts(images(b, args.scale)).items()}
    kw = generate_kwargs(GenerateConfig(num_beams=1, do_sample=True, max_new_tokens=64), builder)
    suppress = suppressed_token_ids(builder.processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out = []
    for variant in ("after", "before"):
        reset_peak(device)
        try:
            sync(device)
            t0 = time.perf_counter()
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                gen = model.generate(**enc, **kw, num_return_sequences=k, min_new_tokens=48)
            seqs, _ = split_samples(gen[:, enc["input_ids"].shape[1]:], builder.eos_id, builder.pad_id)
            sync(device)
            t_gen = time.perf_counter() - t0
            adv = torch.randn(len(seqs), device=device)
            model.train()
            if variant == "after":
                policy = PolicyLogprob(model=model, inner=model, pad_id=builder.pad_id, suppress=suppress,
                                       chunk=args.logprob_chunk,
                                       autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                policy(enc, seqs, k, adv)
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    batch = with_answers(repeat_prompts(enc, k), seqs, builder.pad_id)
                    logits, targets = answer_logits(model, batch, suppress)
                    lp, mask = token_logprobs(logits, targets)
                    loss = scst_loss(sequence_logprob(lp, mask, False), adv)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            total = time.perf_counter() - t0
            out.append({"stage": f"scst_step_{variant}", "images": b, "samples": k,
                        "logprob_chunk": args.logprob_chunk if variant == "after" else b * k,
                        "images_per_s": round(b / total, 2), "generate_s": round(t_gen, 2),
                        "step_s": round(total, 2), "peak_mem_gib": peak_gib(device)})
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # some kernels raise a plain RuntimeError
            if "out of memory" not in str(exc).lower():
                raise
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            out.append({"stage": f"scst_step_{variant}", "images": b, "samples": k, "error": "CUDA OOM",
                        "peak_mem_gib": peak_gib(device)})
        print(json.dumps(out[-1]), flush=True)
    return out


def beam(model, builder, args, device) -> dict:
    from ecomcap.config import GenerateConfig
    from ecomcap.inference.generate import generate_kwargs

    enc = {k: v.to(device) for k, v in builder.prompts(images(args.gen_batch, args.scale)).items()}
    kw = generate_kwargs(GenerateConfig(num_beams=5, max_new_tokens=64, repetition_penalty=1.2,
                                        no_repeat_ngram_size=3), builder)
    model.eval()
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out = model.generate(**enc, **kw, min_new_tokens=48)
    sync(device)
    dt = time.perf_counter() - t0
    new = out.shape[1] - enc["input_ids"].shape[1]
    return {"stage": "beam5_generate", "images": args.gen_batch, "images_per_s": round(args.gen_batch / dt, 2),
            "new_tokens": int(new), "wall_s": round(dt, 2), "peak_mem_gib": peak_gib(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="SFT images per step (configs/qwen25vl_3b_lora.yaml)")
    ap.add_argument("--scst-batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--logprob-chunk", type=int, default=8, help="as configs/qwen25vl_3b_lora.yaml")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny width, small images, on CPU: a code check")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: benchmarks/gpu_sft.py runs only on a GPU machine; skipped")
        print(json.dumps({"bench": "gpu_sft", "skipped": "no CUDA device"}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.scale = 0.125 if args.smoke else 1.0
    if args.smoke:
        args.steps, args.warmup, args.batch, args.scst_batch, args.gen_batch = 1, 0, 2, 2, 2
    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.strategies import apply_strategy
    from ecomcap.training.collate import PromptBuilder

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load(Path(tmp), args.smoke, device)
        builder = PromptBuilder(processor, "请为这张电商商品图生成中文描述，突出品类、颜色、图案和品牌。")
        model, counts = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=32, lora_alpha=64,
                                                             lora_dropout=0.05))
        for stage in (sft, scst, beam):
            with contextlib.suppress(torch.OutOfMemoryError) if stage is not scst else contextlib.nullcontext():
                res = stage(model, builder, args, device)
                for r in res if isinstance(res, list) else [res]:
                    results.append(r)
                    if stage is not scst:
                        print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "gpu_sft", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                      "model": "Qwen2.5-VL-3B (random weights, hub layout)", "trainable": counts.trainable,
                      "total_params": counts.total, "wall_s": round(time.perf_counter() - started, 1),
                      "results": results}))


if __name__ == "__main__":
    main()
