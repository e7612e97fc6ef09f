"""Batched caption generation: beam search (or sampling) over images, `caption_gen.jsonl` out.

Images are batched by image token count (fewer pad tokens), prompts are left-padded, special
and vision tokens are suppressed, and every input id is written exactly once, in input order.
Whole datasets (chunks, worker processes, resume) are captioned by `ecomcap.inference.batch`.
"""
from __future__ import annotations

import io
from collections import abc
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ecomcap.config import GenerateConfig
from ecomcap.data.lengths import FALLBACK_NEW_TOKENS
from ecomcap.inference.decode import generate
from ecomcap.inference.postprocess import postprocess
from ecomcap.modeling.processor import suppressed_token_ids
from ecomcap.training.collate import PromptBuilder, split_samples

# Fields Qwen's published generation_config.json sets (near-greedy sampling); `generate` merges
# that file into every call, so each is set here for every decoding mode, never inherited.
QWEN_GENERATION_FIELDS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty")


def with_length(cfg, length: int | None):
    """`cfg` (any config with `max_new_tokens`) with its own max_new_tokens, else `length`, else 40."""
    if cfg.max_new_tokens is not None:
        return cfg
    return cfg.model_copy(update={"max_new_tokens": length or FALLBACK_NEW_TOKENS})


def with_decode_length(cfg: GenerateConfig, model) -> GenerateConfig:
    """`cfg` with max_new_tokens set: its own, else the length the model's training data asked for
    (recorded at export, see `ecomcap.data.lengths`), else 40."""
    return with_length(cfg, getattr(model, "ecomcap_decode_length", None))


def generate_kwargs(cfg: GenerateConfig, builder: PromptBuilder) -> dict:
    """`generate` arguments that fully define decoding (nothing left to the checkpoint's
    generation_config: beam search and greedy evaluation get neutral sampling fields)."""
    kw = dict(
        max_new_tokens=cfg.max_new_tokens if cfg.max_new_tokens is not None else FALLBACK_NEW_TOKENS,
        num_beams=cfg.num_beams,
        do_sample=cfg.do_sample,
        eos_token_id=builder.eos_id,
        pad_token_id=builder.pad_id,
        suppress_tokens=suppressed_token_ids(builder.processor),
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )
    if cfg.num_beams > 1:
        kw.update(length_penalty=cfg.length_penalty, early_stopping=True)
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=cfg.top_p or 1.0)
    else:
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    return kw


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


@torch.no_grad()
def caption_batch(model, builder: PromptBuilder, images: Sequence[Image.Image], cfg: GenerateConfig) -> list[str]:
    """Captions for one batch of images (post-processed)."""
    cfg = with_decode_length(cfg, model)
    device, dtype = model_device_dtype(model)
    enc = builder.prompts(images)
    enc = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in enc.items()}
    kw = generate_kwargs(cfg, builder)
    n = cfg.rerank.candidates
    if n:  # N beams kept, then rescored with the grounding scorer
        kw.update(num_return_sequences=n, num_beams=max(cfg.num_beams, n), length_penalty=cfg.length_penalty,
                  early_stopping=True)
    out = generate(model, enc, cfg.prefill, penalty_scope=cfg.penalty_scope, **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    if not n:
        texts = builder.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [postprocess(t, cfg.postprocess) for t in texts]
    from ecomcap.inference import rerank as rr

    seqs, _ = split_samples(new, builder.eos_id, builder.pad_id)
    texts = [postprocess(t, cfg.postprocess) for t in builder.processor.tokenizer.batch_decode(seqs, skip_special_tokens=True)]
    logprob = rr.candidate_logprobs(model, enc, seqs, n, builder.pad_id, kw["suppress_tokens"])
    scorer = rr.load_scorer(rr.scorer_path(cfg.rerank.scorer_dir), str(device))
    return rr.rerank(texts, logprob, images, n, cfg.rerank.weight, scorer)


def bucket_batches(weights: Sequence[float], batch_size: int) -> list[list[int]]:
    """Indices sorted by weight (stable among equals), cut into batches: similar lengths together."""
    order = sorted(range(len(weights)), key=lambda i: (weights[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar pixel count (stable within equal sizes)."""
    return bucket_batches([w * h for w, h in sizes], batch_size)


def image_token_counts(processor, sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Image tokens per (width, height) after the processor's resize (min/max pixels, patch
    and merge size); the pixel count where the processor is not Qwen2-VL-like."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = getattr(processor, "image_processor", None)
    size = dict(getattr(ip, "size", None) or {})
    patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
    if not (patch and merge and "shortest_edge" in size and "longest_edge" in size):
        return [w * h for w, h in sizes]
    factor = patch * merge
    out = []
    for w, h in sizes:
        rh, rw = smart_resize(h, w, factor, size["shortest_edge"], size["longest_edge"])
        out.append((rh // factor) * (rw // factor))
    return out


def caption_images(
    model,
    builder: PromptBuilder,
    images: Sequence[Image.Image],
    cfg: GenerateConfig,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[str]:
    """Captions for all `images`, batched by image token count, returned in input order.

    `on_batch(n)` is told after every batch how many images it captioned (progress). With
    `sizes` ((width, height) per image, e.g. from the shard columns) `images` may be
    `LazyImages`: only one batch is then decoded at a time.
    """
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(images)
    sizes = sizes if sizes is not None else [im.size for im in images]
    batches = bucket_batches(image_token_counts(builder.processor, sizes), cfg.batch_size)
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress or None):
        for i, text in zip(idx, caption_batch(model, builder, [images[i] for i in idx], cfg)):
            out[i] = text
        if on_batch is not None:
            on_batch(len(idx))
    model.train(was_training)
    return out


class LazyImages(abc.Sequence):
    """Encoded images decoded on access: a chunk of 2,048 full-size photos holds its JPEG bytes,
    not 2,048 decoded RGB arrays (several MB each), while a batch is captioned."""

    def __init__(self, blobs: Sequence[bytes]):
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i):
        return Image.open(io.BytesIO(self.blobs[i])).convert("RGB")
