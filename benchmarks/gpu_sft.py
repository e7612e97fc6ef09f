"""GPU SFT throughput: the Qwen2.5-VL-3B architecture (random weights, no download), LoRA and
QLoRA in bf16 on synthetic batches; prints samples/s, peak GPU memory and estimated MFU.

    python benchmarks/gpu_sft.py [--steps 20] [--batch 8] [--strategies lora qlora]

Runs only on a CUDA machine; elsewhere it says so and exits 0. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct's architecture (config.json of the release), random weights.
QWEN25_VL_3B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    vision_end_token_id=151653, tie_word_embeddings=True,
)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def synthetic_batch(batch: int, image_px: int, prompt_len: int, answer_len: int, device):
    """Inputs shaped like the pipeline's: one image per row, prompt, answer at the end."""
    from ecomcap.training.collate import AnswerBatch

    grid = image_px // 14
    n_patches, n_img_tokens = grid * grid, grid * grid // 4
    cfg = QWEN25_VL_3B
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        text = torch.randint(100, 150000, (prompt_len + answer_len,), generator=g)
        rows.append(torch.cat([torch.tensor([cfg["vision_start_token_id"]]),
                               torch.full((n_img_tokens,), cfg["image_token_id"]),
                               torch.tensor([cfg["vision_end_token_id"]]), text]))
    ids = torch.stack(rows)
    labels = torch.full_like(ids, -100)
    labels[:, -answer_len:] = ids[:, -answer_len:]
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == cfg["image_token_id"]).long(),
        "pixel_values": torch.randn(batch * n_patches, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch),
    }
    return AnswerBatch(inputs, labels, answer_len).to(device, torch.bfloat16), n_patches, ids.shape[1]


def build_model(strategy: str, tmp: Path):
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.strategies import apply_strategy, quantization_config

    config = Qwen2_5_VLConfig(**QWEN25_VL_3B)
    ft = FinetuneConfig(strategy=strategy, lora_r=32, lora_alpha=64)
    if strategy == "qlora":  # 4-bit needs a checkpoint to quantize on load: write the random one
        path = tmp / "qwen25vl3b-random"
        if not path.is_dir():
            with torch.device("cuda"):
                Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.bfloat16, quantization_config=quantization_config(ft), device_map={"": 0})
    else:
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.config.use_cache = False
    model, counts = apply_strategy(model, ft)
    text_params = sum(p.numel() for n, p in model.named_parameters() if ".visual." not in n)
    vision_params = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
    return model, counts, text_params, vision_params


def run(strategy: str, args, tmp: Path) -> dict:
    from ecomcap.training.collate import answer_logits
    from ecomcap.training.losses import sft_loss

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, counts, n_text, n_vis = build_model(strategy, tmp)
    batch, n_patches, seq = synthetic_batch(args.batch, args.image_px, args.prompt_len, args.answer_len, "cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, targets = answer_logits(model, batch)
        loss = sft_loss(logits, targets, 0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    # frozen weights: forward + input-grad backward ~ 4 FLOPs per parameter per token
    flops = 4 * (n_text * seq + n_vis * n_patches) * args.batch
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = flops / step_s / 1e12
    out = {
        "strategy": strategy, "samples_per_s": round(args.batch / step_s, 2), "step_s": round(step_s, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "tflops": round(achieved, 1), "mfu": round(achieved / peak, 4) if peak else None,
        "trainable": counts.trainable, "total": counts.total, "seq_len": seq, "loss": round(float(loss), 4),
    }
    print(json.dumps(out), flush=True)
    del model, opt
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-px", type=int, default=448)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--answer-len", type=int, default=48)
    ap.add_argument("--strategies", nargs="+", default=["lora", "qlora"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: benchmarks/gpu_sft.py runs only on a GPU machine; skipped")
        print(json.dumps({"bench": "gpu_sft", "skipped": "no CUDA device"}))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            try:
                results.append(run(strategy, args, Path(tmp)))
            except Exception as exc:  # report a strategy that cannot run here, keep the others
                results.append({"strategy": strategy, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"bench": "gpu_sft", "device": torch.cuda.get_device_name(0),
                      "batch": args.batch, "image_px": args.image_px, "results": results}))


if __name__ == "__main__":
    main()
