"""Which decode path a `generate` call takes: the stock one, the prefill-once continuation of
`generate`, or the own beam-search loop (`ecomcap.inference.beam`).

`mode="hf"` keeps the stock path (`generate` expands inputs before prefill) for comparison.
"""
from __future__ import annotations

from typing import Literal

import torch

from ecomcap.inference import beam
from ecomcap.inference.penalties import PenaltyScope, hf_kwargs
from ecomcap.inference.prefill import cache_kwarg, expand_size, generative_model, prefill_prompt
from ecomcap.modeling.partitions import generation_gathered

PrefillMode = Literal["once", "hf"]


@torch.no_grad()
def generate_prefill_once(model, enc: dict[str, torch.Tensor], penalty_scope: PenaltyScope = "prompt", **kw):
    """`model.generate(**enc, **kw)` with the prompt prefilled once per image.

    Same outputs as the stock call (token ids; scores up to float rounding). Plain beam search runs
    `beam.beam_search` (the prompt prefilled whole, own decode loop); anything else it does not
    implement continues `generate` from the expanded cache. Falls back to the stock call when
    nothing is expanded (greedy, one sample), the prompt is a single token or the generation
    config names a cache implementation of its own. `penalty_scope`: which tokens the
    repetition penalty and n-gram blocking read (`ecomcap.inference.penalties`).
    """
    gm = generative_model(model)
    n = expand_size(kw)
    # a checkpoint's generation_config asking for its own cache ("static", "offloaded", ...)
    # makes `generate` refuse a passed one: such models keep the stock path
    own_cache = kw.get("cache_implementation") or getattr(getattr(gm, "generation_config", None),
                                                          "cache_implementation", None)
    if n == 1 or enc["input_ids"].shape[1] < 2 or own_cache:
        return model.generate(**enc, **hf_kwargs(kw, penalty_scope))
    settings = beam.plan(gm, kw, penalty_scope)
    if settings is not None:
        return beam.beam_search(model, enc, **settings)
    kw = hf_kwargs(kw, penalty_scope)
    position_ids, cache = prefill_prompt(model, enc, n)
    rest = {k: v for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                       "video_grid_thw")}
    return model.generate(**rest, position_ids=position_ids, **{cache_kwarg(): cache}, **kw)


def generate(model, enc: dict[str, torch.Tensor], mode: PrefillMode = "once", penalty_scope: PenaltyScope = "prompt",
             **kw):
    """Dispatch: `once` (prefill once per image) or `hf` (stock `generate`), both under the same
    penalty rule."""
    if "synced_gpus" not in kw:
        peers = beam.zero3_peers(generative_model(model))
        if peers or generation_gathered():
            # partitioned ranks step together (also where transformers' flag is unset); gathered ones
            # decode alone (transformers would infer True from its global ZeRO-3 flag)
            kw = {**kw, "synced_gpus": peers}
    if mode == "hf":
        return model.generate(**enc, **hf_kwargs(kw, penalty_scope))
    return generate_prefill_once(model, enc, penalty_scope, **kw)
