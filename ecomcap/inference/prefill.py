"""Prefill once per image, then expand the KV cache to the beams / samples.

`generate(num_beams=n)` (and `num_return_sequences=k`) repeats every prompt n times *before*
the prefill, so the prompt and its 256-1,280 image tokens go through the language model n
times over. Here the prompt minus its last token is run once per image (vision tower and
language model), the cache is repeated n times in the batch dimension, and the very same
`generate` call (same logits processors, beam scorer, sampling RNG) continues from it: its
prefill is then one token per beam. The 3D mRoPE positions (computed from `mm_token_type_ids`
and `image_grid_thw`) are built once for the whole prompt and handed to `generate`, which
expands and extends them exactly as on its own path, so decoding never reads the model's
`rope_deltas` state (left per prompt, [B, 1], as the stock path leaves it).

Plain beam search goes further (`ecomcap.inference.beam`): the whole prompt is prefilled once,
the first step reads one row per image, and a decode loop that follows `_beam_search` operation by
operation skips the work beam search does not read.

The dispatch between the paths is `ecomcap.inference.decode.generate`.
"""
from __future__ import annotations

import torch

from ecomcap.modeling.unwrap import generative_model  # noqa: F401  (re-exported: inference's callers)


def cache_kwarg() -> str:
    """The name `generate` takes a ready cache under: `past_key_values` up to transformers 5.23
    (which rejects `cache` as an unused model kwarg), `cache` from 5.24 on (where
    `past_key_values` is a deprecated alias)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def expand_size(kw: dict) -> int:
    """How many sequences `generate` decodes per prompt (beams or returned samples)."""
    return max(int(kw.get("num_beams") or 1), int(kw.get("num_return_sequences") or 1))


def prompt_positions(gm, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids for the whole prompt, computed the way `generate` computes them ([4, B, L] for
    Qwen2.5-VL: text row + 3 mRoPE rows from `mm_token_type_ids` and `image_grid_thw`)."""
    return gm._prepare_position_ids_for_generation(enc["input_ids"], {k: v for k, v in enc.items()
                                                                      if k != "input_ids"})


def forward_last(model, **inputs) -> tuple[torch.Tensor, object]:
    """One cached forward: (the last position's logits, the cache)."""
    out = model(**inputs, use_cache=True, logits_to_keep=1, return_dict=True)
    return out.logits[:, -1, :], (out.cache if hasattr(out, "cache") else out.past_key_values)


@torch.no_grad()
def prefill_prompt(model, enc: dict[str, torch.Tensor], n: int):
    """Run the prompt without its last token once per row; return (position_ids, cache for n copies).

    `position_ids` covers the whole prompt ([4, B, L] for Qwen2.5-VL: text row + 3 mRoPE rows),
    computed the way `generate` computes them; the cache holds the first L-1 tokens of each
    prompt, repeated `n` times per row (row-major: the n copies of a prompt are adjacent, as
    `generate` orders beams).
    """
    ids = enc["input_ids"]
    position_ids = prompt_positions(generative_model(model), enc)
    head = {
        "input_ids": ids[:, :-1],
        "attention_mask": enc["attention_mask"][:, :-1],
        "position_ids": position_ids[..., :-1],
    }
    if "mm_token_type_ids" in enc:
        head["mm_token_type_ids"] = enc["mm_token_type_ids"][:, :-1]
    rest = {k: v for k, v in enc.items() if k not in head}
    _, cache = forward_last(model, **head, **rest)
    if n > 1:
        cache.batch_repeat_interleave(n)
    return position_ids, cache
