"""Image-token budget: prompt + image tokens + answer must fit the model before training starts.

Qwen2.5-VL turns each image into (h/28)*(w/28) tokens after resizing it into
[min_pixels, max_pixels], so a large or long image can take thousands of tokens. A sequence
over the limit gets cut somewhere (the classic "image features and image tokens do not match"
failure) or runs out of memory hours into a run; here it is found up front, from the width and
height ingest stored with each image (metadata columns only: no image bytes are read, so every
rank can afford it and all ranks stop alike), with the ids of the images that would not fit.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pyarrow.parquet as pq
from PIL import Image

from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    images: int
    prompt_tokens: int
    answer_tokens: int
    max_image_tokens: int
    longest: int
    limit: int


def image_token_count(width: int, height: int, image_processor) -> int:
    """Merged image tokens the processor produces for a width x height image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = getattr(image_processor, "size", None) or {}
    lo = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
    hi = size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    return (h // patch) * (w // patch) // (merge * merge)


def model_token_limit(model, max_seq_len: int | None) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or 10**9
    return min(limit, max_seq_len) if max_seq_len else limit


def image_sizes(data) -> list[tuple[int, int]]:
    """(width, height) of each of `data`'s rows from the shards' metadata columns; an image
    header only for shards written without them."""
    by_file: dict[int, list[tuple[int, int]] | None] = {}
    out = []
    for i, (f, g, r) in enumerate(data.where):
        if f not in by_file:
            pf = pq.ParquetFile(data.files[f])
            if {"width", "height"} <= set(pf.schema_arrow.names):
                t = pf.read(columns=["width", "height"])
                sizes = list(zip(t.column("width").to_pylist(), t.column("height").to_pylist()))
                starts = [0]
                for k in range(pf.num_row_groups - 1):
                    starts.append(starts[-1] + pf.metadata.row_group(k).num_rows)
                by_file[f] = [sizes, starts]
            else:
                by_file[f] = None
        meta = by_file[f]
        if meta is not None and meta[0][meta[1][g] + r][0]:
            out.append(meta[0][meta[1][g] + r])
        else:
            out.append(Image.open(io.BytesIO(data.image_bytes(i))).size)
    return out


def check_token_budget(data, builder, answer_tokens: int, limit: int, show: int = 5) -> Budget:
    """Raise (listing the images) when any prompt + image + answer would exceed `limit`."""
    processor = builder.processor
    # the template holds one <|image_pad|>; the processor expands it to the image's tokens
    prompt = len(processor.tokenizer(builder.text, add_special_tokens=False)["input_ids"]) - 1
    over: list[tuple[str, int]] = []
    extreme: list[str] = []
    most = 0
    for i, (w, h) in enumerate(image_sizes(data)):
        try:
            n = image_token_count(w, h, processor.image_processor)
        except ValueError:  # aspect ratio > 200: the processor refuses it (and the whole batch)
            extreme.append(f"{data.ids[i]} ({w}x{h})")
            continue
        most = max(most, n)
        if prompt + n + answer_tokens > limit:
            over.append((data.ids[i], n))
    budget = Budget(len(data), prompt, answer_tokens, most, prompt + most + answer_tokens, limit)
    if extreme:
        raise EcomcapError(
            f"{len(extreme)} of {len(data)} training images have an aspect ratio over 200:1, which "
            f"Qwen2.5-VL's image processor cannot resize (e.g. {', '.join(extreme[:show])}); re-ingest "
            "the data: ingest quarantines them (reason extreme_aspect_ratio, data.ingest.max_aspect_ratio)")
    if over:
        listed = ", ".join(f"{i} ({n} image tokens)" for i, n in over[:show])
        raise EcomcapError(
            f"{len(over)} of {len(data)} images exceed the {limit}-token limit with a {prompt}-token "
            f"prompt and {answer_tokens} answer tokens: {listed}; "
            "lower model.max_pixels, or raise model.max_seq_len")
    log.info("token budget: %d images, prompt %d + image <= %d + answer %d = %d <= %d", budget.images,
             prompt, most, answer_tokens, budget.longest, limit)
    return budget
