"""Image-token budget: prompt + image tokens + answer must fit the model before training starts.

Qwen2.5-VL turns each image into (h/28)*(w/28) tokens after resizing it into
[min_pixels, max_pixels], so a large or long image can take thousands of tokens. A sequence
over the limit gets cut somewhere (the classic "image features and image tokens do not match"
failure) or runs out of memory hours into a run; here it is found up front, from each image's
header (no decoding), with the ids of the images that would not fit.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

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


def check_token_budget(data, builder, answer_tokens: int, limit: int, show: int = 5) -> Budget:
    """Raise (listing the images) when any prompt + image + answer would exceed `limit`."""
    processor = builder.processor
    # the template holds one <|image_pad|>; the processor expands it to the image's tokens
    prompt = len(processor.tokenizer(builder.text, add_special_tokens=False)["input_ids"]) - 1
    over: list[tuple[str, int]] = []
    unusable: list[str] = []
    most = 0
    for i in range(len(data)):
        try:
            w, h = Image.open(io.BytesIO(data.image_bytes(i))).size
            n = image_token_count(w, h, processor.image_processor)
        except (ValueError, OSError):  # aspect ratio > 200 or no readable header
            unusable.append(data.ids[i])
            continue
        most = max(most, n)
        if prompt + n + answer_tokens > limit:
            over.append((data.ids[i], n))
    budget = Budget(len(data), prompt, answer_tokens, most, prompt + most + answer_tokens, limit)
    if over or unusable:
        listed = ", ".join(f"{i} ({n} image tokens)" for i, n in over[:show])
        raise EcomcapError(
            f"{len(over)} of {len(data)} images exceed the {limit}-token limit with a {prompt}-token "
            f"prompt and {answer_tokens} answer tokens{': ' + listed if listed else ''}"
            f"{f'; {len(unusable)} images cannot be resized (e.g. {unusable[0]})' if unusable else ''}; "
            "lower model.max_pixels, or raise model.max_seq_len")
    log.info("token budget: %d images, prompt %d + image <= %d + answer %d = %d <= %d", budget.images,
             prompt, most, answer_tokens, budget.longest, limit)
    return budget
