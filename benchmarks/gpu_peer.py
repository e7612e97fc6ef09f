"""ecomcap against its peers on one GPU, one prepared call: the full-size Qwen2.5-VL-3B (random
weights, hub layout, loaded like `Qwen/Qwen2.5-VL-3B-Instruct`), every side on the same data.

- sft: ecomcap's step (answer-only chunked cross-entropy; padded and packed) vs TRL's `SFTTrainer` (prompt-completion,
  its VLM collator): same image-caption pairs, LoRA r16 on the same modules, batch, constant LR,
  no gradient checkpointing; samples/s, peak memory, MFU (matmul FLOPs), and held-out CE after
  equal steps, both models scored by one scorer over ecomcap's answer tokens and over TRL's
  (TRL's completion also holds the "\\n" after <|im_end|>: a near-free token in its average);
- decode: the shipped penalties (beam 5, repetition 1.2, no-repeat 3-grams) on stock `generate`
  vs the own loop, and beam 5 without penalties, at two batch sizes: images/s and ms per step
  (EOS suppressed, so every path decodes max_new_tokens steps);
- vision: the tower's forward with the Conv3d vs the matmul patch embedding, sdpa vs
  flash-attention (where installed);
- qlora: the 4-bit census (modules under `.visual.` that are 4-bit: must be 0) and one step;
- scst: one SCST step (K samples per image through the prefill-once path, the chunked log-prob pass).

    python benchmarks/gpu_peer.py [--steps 20] [--smoke]   # --smoke: tiny width on CPU, both sides

The GPU machine has no package registry: TRL and its dependencies travel as wheels
(`scripts/peer_wheels.sh` fills .whl_peer/; docs/benchmarks.md has the device command).
Without CUDA and --smoke it prints a 'skipped' JSON. Last line: one JSON object.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from gpu_sft import achieved, images, peak_gib, reset_peak, sync, timed_sft_steps  # noqa: E402

from ecomcap.config import ModelConfig  # noqa: E402
from ecomcap.modeling.unwrap import generative_model  # noqa: E402

PROMPT = ModelConfig().prompt  # the detailed instruction real checkpoints are trained with
COLOURS, ITEMS, PATTERNS = ["红色", "蓝色", "白色", "黑色", "绿色"], ["连衣裙", "T恤", "卫衣", "衬衫"], ["条纹", "碎花", "纯色", "格子"]


def pairs(n: int, scale: float, seed: int) -> list[tuple]:
    """(image, caption) pairs whose caption follows the image's colour and size (learnable)."""
    import random

    rng = random.Random(seed)
    ims = images(n, scale)
    out = []
    for i, im in enumerate(ims):
        c = i % len(COLOURS)
        cap = f"这款{COLOURS[c]}{rng.choice(PATTERNS)}{ITEMS[(im.size[0] > im.size[1]) + 2 * (i % 2)]}，版型修身，简约百搭。"
        out.append((im, cap))
    return out


def ingested(split: Path, n: int) -> list[tuple]:
    """(image, first reference) of the first `n` images of an ingested split."""
    from ecomcap.training.data import ShardImages

    data = ShardImages(split)
    return [(data.image(i), data.texts[i][0]) for i in range(min(n, len(data)))]


def heldout_ce(model, builder, held, device, newline: bool) -> float:
    """Token-mean cross-entropy of the held-out captions (ecomcap's answer tokens, or TRL's: + "\\n")."""
    from ecomcap.training.collate import IGNORE, answer_logits, with_answers

    (nl,) = builder.processor.tokenizer.encode("\n", add_special_tokens=False)
    model.eval()
    total = count = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(held), 4):
            chunk = held[i:i + 4]
            answers = [ids + [nl] if newline else ids for ids in builder.answer_ids([c for _, c in chunk], 64)]
            batch = with_answers(builder.prompts([im for im, _ in chunk]), answers, builder.pad_id).to(device)
            logits, targets = answer_logits(model, batch)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                                             reduction="sum"))
            count += float((targets != IGNORE).sum())
    model.train()
    return round(total / count, 4)


def _batch(builder, chunk):
    from ecomcap.training.collate import with_answers

    return with_answers(builder.prompts([im for im, _ in chunk]), builder.answer_ids([c for _, c in chunk], 64),
                        builder.pad_id)


def _mfu(model, builder, train, args, step_s: float) -> float | None:
    return achieved(model, _batch(builder, train[: args.batch]), step_s)[1]


def sft_ours(load, builder, train, held, args, device, packed: bool = False) -> dict:
    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.strategies import apply_strategy
    from ecomcap.training.answer_loss import answer_loss

    torch.manual_seed(args.seed)
    model, _ = apply_strategy(load(), FinetuneConfig(strategy="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0))

    def batch_at(step):  # the processor runs inside the timed step, as in TRL's collator
        return _batch(builder, [train[(step * args.batch + j) % len(train)] for j in range(args.batch)]).to(device)

    step_s, _ = timed_sft_steps(model, args, device, batch_at, lambda m, b: answer_loss(m, b, 0.0, 1024, packed=packed),
                                lr=args.lr)
    out = {"side": "ecomcap_packed" if packed else "ecomcap", "samples_per_s": round(args.batch / step_s, 2),
           "step_s": round(step_s, 3), "peak_mem_gib": peak_gib(device), "mfu": _mfu(model, builder, train, args, step_s),
           "heldout_ce_ecomcap_tokens": heldout_ce(model, builder, held, device, False),
           "heldout_ce_trl_tokens": heldout_ce(model, builder, held, device, True)}
    del model
    return out


def sft_trl(load, builder, train, held, args, device, tmp: Path) -> dict:
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        return {"side": "trl", "skipped": f"TRL not importable ({exc}): carry its wheels (scripts/peer_wheels.sh)"}
    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.strategies import lora_target_regex

    order = [train[(i % len(train))] for i in range((args.warmup + args.steps) * args.batch)]
    rows = {"images": [[im] for im, _ in order],
            "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]]
            * len(order),
            "completion": [[{"role": "assistant", "content": [{"type": "text", "text": c}]}] for _, c in order]}
    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync(device)
            marks["t0"] = time.perf_counter()
            if state.global_step == args.warmup:
                reset_peak(device)

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - marks["t0"])

    torch.manual_seed(args.seed)
    cfg = SFTConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.batch,
                    max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, max_length=None,
                    bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                    logging_steps=1, dataloader_num_workers=0, seed=args.seed, data_seed=args.seed,
                    optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_regex(FinetuneConfig()),
                      bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=load(), args=cfg, train_dataset=Dataset.from_dict(rows),
                         processing_class=builder.processor, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    step_s = sum(times) / max(1, len(times))
    model = trainer.model
    return {"side": "trl", "samples_per_s": round(args.batch / step_s, 2), "step_s": round(step_s, 3),
            "peak_mem_gib": peak_gib(device), "mfu": _mfu(model, builder, train, args, step_s),
            "heldout_ce_ecomcap_tokens": heldout_ce(model, builder, held, device, False),
            "heldout_ce_trl_tokens": heldout_ce(model, builder, held, device, True)}


def _decode_kw(builder, beams: int, penalties: bool, new_tokens: int) -> dict:
    """`generate` arguments with EOS never reachable (a suppressed id): every path decodes `new_tokens`."""
    from ecomcap.config import GenerateConfig
    from ecomcap.inference.generate import generate_kwargs

    kw = generate_kwargs(GenerateConfig(num_beams=beams, max_new_tokens=new_tokens, repetition_penalty=1.2 if penalties
                                        else 1.0, no_repeat_ngram_size=3 if penalties else 0), builder)
    return {**kw, "eos_token_id": kw["suppress_tokens"][0]}


def decode(model, builder, args, device) -> list[dict]:
    from ecomcap.inference.decode import generate

    model.eval()
    out = []
    for batch in args.gen_batches:
        enc = {k: v.to(device) for k, v in builder.prompts(images(batch, args.scale)).items()}
        for name, penalties, mode, scope in (("shipped_penalties_hf_generate", True, "hf", "prompt"),
                                             ("shipped_penalties_own_loop", True, "once", "generated"),
                                             ("beam5_hf_generate", False, "hf", "prompt"),
                                             ("beam5_own_loop", False, "once", "generated")):
            kw = _decode_kw(builder, 5, penalties, args.new_tokens)
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                ids = generate(model, enc, mode, penalty_scope=scope, **kw)
            sync(device)
            dt = time.perf_counter() - t0
            steps = ids.shape[1] - enc["input_ids"].shape[1]
            out.append({"stage": f"decode_{name}", "batch": batch, "images_per_s": round(batch / dt, 2),
                        "ms_per_step": round(1000 * dt / max(1, steps), 1), "steps": steps,
                        "peak_mem_gib": peak_gib(device)})
            print(json.dumps(out[-1]), flush=True)
    return out


def vision(model, builder, args, device) -> list[dict]:
    """The vision tower alone: Conv3d vs matmul patch embedding; sdpa vs flash-attention 2."""
    import importlib.util

    from ecomcap.modeling.patch_embed import patch_embed_as_matmul, runs_matmul

    enc = {k: v.to(device) for k, v in builder.prompts(images(args.batch, args.scale)).items()}
    visual = generative_model(model).model.visual
    impls = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") and device.type == "cuda" else [])
    out = []
    for impl in impls:
        visual.config._attn_implementation = impl
        for matmul in (False, True):
            assert not runs_matmul(model)  # loaded with patch_embed: conv; the block below swaps it
            ctx = patch_embed_as_matmul(model) if matmul else torch.autocast(device.type, enabled=False)
            times = []
            with ctx, torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                for _ in range(3):
                    sync(device)
                    t0 = time.perf_counter()
                    visual(enc["pixel_values"].to(next(visual.parameters()).dtype), grid_thw=enc["image_grid_thw"])
                    sync(device)
                    times.append(time.perf_counter() - t0)
            best = min(times[1:] or times)
            out.append({"stage": f"vision_{impl}_{'matmul' if matmul else 'conv3d'}", "images": args.batch,
                        "ms": round(1000 * best, 1)})
            print(json.dumps(out[-1]), flush=True)
    visual.config._attn_implementation = "sdpa"
    return out


def qlora(path: Path, builder, train, args, device) -> dict:
    """4-bit base: census of 4-bit modules under the vision tower (must be 0) and one LoRA step."""
    from transformers import AutoModelForImageTextToText

    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.strategies import (
        apply_strategy,
        bnb_4bit_config,
        check_vision_16bit,
        quantized_vision_modules,
    )
    from ecomcap.training.answer_loss import answer_loss

    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), quantization_config=bnb_4bit_config(),
                                                            dtype=torch.bfloat16, device_map={"": device.index or 0}
                                                            if device.type == "cuda" else {"": "cpu"})
    except ImportError as exc:
        return {"stage": "qlora", "skipped": f"bitsandbytes not importable ({exc})"}
    four = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    vision4 = len(quantized_vision_modules(model))
    check_vision_16bit(model)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="qlora", lora_r=16))
    batch = _batch(builder, train[: args.batch]).to(device)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        answer_loss(model, batch, 0.0).backward()
    sync(device)
    return {"stage": "qlora", "linear4bit_modules": four, "vision_4bit_modules": vision4,
            "step_s": round(time.perf_counter() - t0, 3), "peak_mem_gib": peak_gib(device)}


def scst(model, builder, args, device) -> dict:
    """One SCST step: K samples per image through the prefill-once path, then the chunked
    log-prob pass with its backward (the reward is replaced by random advantages)."""
    from ecomcap.inference.decode import generate
    from ecomcap.modeling.processor import suppressed_token_ids
    from ecomcap.training.collate import split_samples
    from ecomcap.training.logprob import PolicyLogprob

    k, b = args.samples, args.scst_batch
    enc = {key: v.to(device) for key, v in builder.prompts(images(b, args.scale)).items()}
    kw = {**_decode_kw(builder, 1, False, args.new_tokens), "do_sample": True, "temperature": 1.0}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        gen = generate(model, enc, "once", num_return_sequences=k, **kw)
    seqs, _ = split_samples(gen[:, enc["input_ids"].shape[1]:], builder.eos_id, builder.pad_id)
    sync(device)
    t_gen = time.perf_counter() - t0
    model.train()
    policy = PolicyLogprob(model=model, inner=model, pad_id=builder.pad_id, suppress=suppressed_token_ids(builder.processor),
                           chunk=args.logprob_chunk,
                           autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"))
    policy(enc, seqs, k, torch.randn(len(seqs), device=device))
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    total = time.perf_counter() - t0
    return {"stage": "scst_step", "images": b, "samples": k, "generate_s": round(t_gen, 2), "step_s": round(total, 2),
            "peak_mem_gib": peak_gib(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="equal optimizer steps on each side (20; --smoke: 4)")
    ap.add_argument("--seed", type=int, default=0, help="LoRA init and data order on both sides")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="images per step (8; --smoke: 2)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--gen-batches", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--scst-batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--logprob-chunk", type=int, default=8)
    ap.add_argument("--parts", nargs="+", default=["sft", "decode", "vision", "qlora", "scst"])
    ap.add_argument("--smoke", action="store_true", help="tiny width, small images, on CPU: both sides, a code check")
    ap.add_argument("--model", help="a local model directory instead of the random 3B (e.g. make run's tiny model)")
    ap.add_argument("--data", help="an ingested data directory (train/, valid/): its images and first references")
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print(json.dumps({"bench": "gpu_peer", "skipped": "no CUDA device (use --smoke on CPU)"}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.scale = 0.125 if args.smoke else 1.0
    if args.smoke:
        args.warmup, args.scst_batch, args.samples = 1, 2, 2
        args.gen_batches, args.new_tokens, args.lr = [2], 6, 1e-3
    args.steps = args.steps or (4 if args.smoke else 20)
    args.batch = args.batch or (2 if args.smoke else 8)
    from ecomcap.modeling.hubfixture import QWEN25_VL_3B, TEST_ARCH, build_hub_checkpoint
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.processor import load_processor
    from ecomcap.training.collate import PromptBuilder

    started, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
            cfg = ModelConfig(name_or_path=str(path), device=device.type,
                              dtype="bfloat16" if device.type == "cuda" else "float32")
        else:
            path = build_hub_checkpoint(Path(tmp) / "Qwen2.5-VL-3B-Instruct-random",
                                        TEST_ARCH if args.smoke else QWEN25_VL_3B)
            cfg = ModelConfig(name_or_path=str(path), device=device.type, dtype="bfloat16" if device.type == "cuda"
                              else "float32", min_pixels=200704 // (64 if args.smoke else 1), max_pixels=401408)

        def load(patch_embed: str = "matmul"):
            return load_base(cfg.model_copy(update={"patch_embed": patch_embed}))[0]

        processor = load_processor(str(path), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        builder = PromptBuilder(processor, args.prompt)
        if args.data:
            train, held = ingested(Path(args.data) / "train", args.batch * 6), ingested(Path(args.data) / "valid", 32)
        else:
            data = pairs(args.batch * 6 + 16, args.scale, seed=1 + args.seed)
            train, held = data[:-16], data[-16:]
        if "sft" in args.parts:
            for side in (sft_ours(load, builder, train, held, args, device),
                         sft_ours(load, builder, train, held, args, device, packed=True),
                         sft_trl(load, builder, train, held, args, device, Path(tmp))):
                results.append({"stage": "sft", **side})
                print(json.dumps(results[-1]), flush=True)
        model = load() if {"decode", "scst"} & set(args.parts) else None
        if "decode" in args.parts:
            results += decode(model, builder, args, device)
        if "scst" in args.parts:
            from ecomcap.config import FinetuneConfig
            from ecomcap.modeling.strategies import apply_strategy

            model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=16))
            results.append(scst(model, builder, args, device))
            print(json.dumps(results[-1]), flush=True)
        del model
        if "vision" in args.parts:
            results += vision(load("conv"), builder, args, device)
        if "qlora" in args.parts:
            results.append(qlora(path, builder, train, args, device))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"bench": "gpu_peer", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                      "model": args.model or ("tiny width (smoke)" if args.smoke else "Qwen2.5-VL-3B (random weights, hub layout)"),
                      "steps": args.steps, "batch": args.batch, "wall_s": round(time.perf_counter() - started, 1),
                      "results": results}))


if __name__ == "__main__":
    main()
