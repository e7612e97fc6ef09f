"""Batched caption generation: beam search (or sampling) over images, `caption_gen.jsonl` out.

Images are batched by similar size (fewer pad tokens), prompts are left-padded, special and
vision tokens are suppressed, and every input id is written exactly once, in input order.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ecomcap.config import GenerateConfig
from ecomcap.data.formats import write_predictions
from ecomcap.inference.postprocess import postprocess
from ecomcap.inference.prefill import generate
from ecomcap.modeling.processor import suppressed_token_ids
from ecomcap.training.collate import PromptBuilder

log = logging.getLogger(__name__)


def generate_kwargs(cfg: GenerateConfig, builder: PromptBuilder) -> dict:
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
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
    return kw


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


@torch.no_grad()
def caption_batch(model, builder: PromptBuilder, images: Sequence[Image.Image], cfg: GenerateConfig) -> list[str]:
    """Captions for one batch of images (post-processed)."""
    device, dtype = model_device_dtype(model)
    enc = builder.prompts(images)
    enc = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in enc.items()}
    out = generate(model, enc, cfg.prefill, **generate_kwargs(cfg, builder))
    new = out[:, enc["input_ids"].shape[1]:]
    texts = builder.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [postprocess(t, cfg.postprocess) for t in texts]


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar pixel count (stable within equal sizes)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def caption_images(
    model,
    builder: PromptBuilder,
    images: Sequence[Image.Image],
    cfg: GenerateConfig,
    progress: bool = True,
) -> list[str]:
    """Captions for all `images`, batched by size, returned in input order."""
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(images)
    batches = size_batches([im.size for im in images], cfg.batch_size)
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress or None):
        for i, text in zip(idx, caption_batch(model, builder, [images[i] for i in idx], cfg)):
            out[i] = text
    model.train(was_training)
    return out


def decode_images(blobs: Iterable[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]


def generate_for_dataset(
    model, processor, prompt: str, dataset_dir: str | Path, out_path: str | Path,
    cfg: GenerateConfig, limit: int | None = None,
) -> dict[str, str]:
    """Caption every image of an ingested dataset (in chunks) and write `caption_gen.jsonl`.

    Ids the ingest quarantined (an image that does not decode cannot be captioned) are written
    with an empty caption, so the file still has every input id exactly once.
    """
    from ecomcap.data.shards import iter_batches, read_report

    builder = PromptBuilder(processor, prompt)
    preds: dict[str, str] = {}
    chunk = max(cfg.batch_size * 16, 64)
    for rb in iter_batches(dataset_dir, ["image_id", "image"], batch_size=chunk):
        ids = rb.column(0).to_pylist()
        if limit is not None:
            ids = ids[: max(limit - len(preds), 0)]
        if not ids:
            break
        images = decode_images(rb.column(1).to_pylist()[: len(ids)])
        preds.update(zip(ids, caption_images(model, builder, images, cfg)))
    quarantined = _quarantined_ids(Path(dataset_dir)) if limit is None else []
    for qid in quarantined:
        preds.setdefault(qid, "")
    if quarantined:
        log.warning("%d quarantined ids written with empty captions", len(quarantined))
    report = read_report(dataset_dir)
    log.info("captioned %d images of split %s", len(preds), report.get("split"))
    write_predictions(out_path, preds.items())
    return preds


def _quarantined_ids(dataset_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    q = dataset_dir / "quarantine.parquet"
    if not q.is_file():
        return []
    rows = pq.read_table(q, columns=["image_id", "reason"]).to_pylist()
    return list(dict.fromkeys(r["image_id"] for r in rows if r["image_id"] and r["reason"] != "duplicate_id"))
