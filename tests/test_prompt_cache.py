"""The training prompt cache: batches rebuilt from cached rows equal the processor's own, bit for
bit (mixed image sizes: left padding, different patch counts), memory stays bounded, an unknown
processor layout turns it off, and SFT trains the same weights with it on or off."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ecomcap.config import FinetuneConfig, GenerateConfig, SFTConfig
from ecomcap.modeling.load import load_base
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.prompt_cache import PromptCache
from ecomcap.training.sft import run_sft, sft_identity

SIZES = [(112, 112), (200, 150), (60, 90), (224, 224), (140, 84), (84, 140)]


@pytest.fixture(scope="module")
def builder(tiny_model_cfg):
    _, processor = load_base(tiny_model_cfg)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    return PromptBuilder(processor, tiny_model_cfg.prompt)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_cached_batches_equal_the_processors_and_skip_the_work(builder):
    images, decoded = _images(), []

    def load(keys):
        decoded.extend(keys)
        return [images[k] for k in keys]

    cache = PromptCache(builder, max_bytes=1 << 30)
    rng = np.random.default_rng(1)
    batches = [[0, 1, 2], [2, 3, 4, 5], [5, 0, 3], [1, 1, 4]] + [list(rng.integers(0, 6, 4)) for _ in range(6)]
    for keys in batches:
        _equal(cache.prompts(keys, load), builder.prompts([images[k] for k in keys]))
    assert sorted(decoded) == list(range(6))  # each image decoded and processed once
    assert cache.misses == 6 and cache.hits == sum(map(len, batches)) - 6


def test_memory_stays_within_the_budget(builder):
    """Full: no more rows are admitted (no churn under a reshuffled order); the rest are processed."""
    images = _images()
    one = PromptCache(builder, max_bytes=1 << 30)
    one.prompts([0, 1], lambda keys: [images[k] for k in keys])
    cache = PromptCache(builder, max_bytes=int(1.2 * one._bytes))
    held: set = set()
    for keys in ([0, 1, 2], [3, 4], [5, 0], [1, 2, 3, 4, 5]):
        _equal(cache.prompts(keys, lambda ks: [images[k] for k in ks]), builder.prompts([images[k] for k in keys]))
        assert cache._bytes <= cache.max_bytes and held <= set(cache._rows)  # nothing evicted
        held = set(cache._rows)
    assert {0, 1} <= held != set(range(6)) and cache.misses > 6  # rows not held are processed again


def test_an_unknown_processor_layout_turns_the_cache_off(builder, caplog):
    images = _images()

    class ExtraKeys:  # a processor that returns something the cache cannot split
        def __init__(self, inner):
            self.inner, self.processor, self.pad_id = inner, inner.processor, inner.pad_id

        def prompts(self, ims):
            return {**self.inner.prompts(ims), "second_per_grid_ts": torch.ones(len(ims))}

    odd = ExtraKeys(builder)
    cache = PromptCache(odd, max_bytes=1 << 30)
    with caplog.at_level(logging.WARNING):
        out = cache.prompts([0, 1, 1], lambda ks: [images[k] for k in ks])
    _equal(out, odd.prompts([images[k] for k in (0, 1, 1)]))
    assert not cache.enabled and "prompt cache off" in caplog.text
    _equal(cache.prompts([2, 0], lambda ks: [images[k] for k in ks]), odd.prompts([images[2], images[0]]))


def test_sft_trains_the_same_weights_with_the_cache_on_or_off(tiny_model_cfg, mixed_data, tmp_path, caplog):
    """Images of mixed sizes (left padding in the batches), more than an epoch (8 steps of 8 over
    the 48 training images), so later steps are served from memory."""
    ft, gen = FinetuneConfig(strategy="full"), GenerateConfig(num_beams=1, max_new_tokens=4, batch_size=4)
    weights, ids = {}, set()
    for mb in (0, 64):
        cfg = SFTConfig(output_dir=tmp_path / str(mb), max_steps=8, batch_size=8, lr=5e-3, eval_every=0,
                        eval_images=2, save_every=0, seed=3, prompt_cache_mb=mb)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ecomcap.training"):
            res = run_sft(mixed_data["train"], mixed_data["valid"], tiny_model_cfg, ft, cfg, gen)
        weights[mb] = load_file(str(res.final_dir / "model.safetensors"))
        ids.add(sft_identity(mixed_data["train"], tiny_model_cfg, ft, cfg.model_copy(update={"output_dir": "x"}),
                             0)[1])
    assert "prompt cache: 16 rows from memory, 48 processed" in caplog.text  # the cache really served
    assert weights[0].keys() == weights[64].keys()
    assert all(torch.equal(weights[0][k], weights[64][k]) for k in weights[0])
    assert len(ids) == 1  # a speed setting: the same run identity


def test_rows_that_depend_on_their_batch_turn_the_cache_off(builder, caplog):
    """A processor whose row for an image changes with the batch around it (here: pixels scaled by
    the batch size) passes the split/rebuild round trip but not the one-image check."""
    images = _images()

    class BatchDependent:
        def __init__(self, inner):
            self.inner, self.processor, self.pad_id = inner, inner.processor, inner.pad_id

        def prompts(self, ims):
            out = self.inner.prompts(ims)
            return {**out, "pixel_values": out["pixel_values"] * len(ims)}

    odd = BatchDependent(builder)
    cache = PromptCache(odd, max_bytes=1 << 30)
    with caplog.at_level(logging.WARNING):
        _equal(cache.prompts([0, 1], lambda ks: [images[k] for k in ks]), odd.prompts([images[0], images[1]]))
    assert not cache.enabled and "prompt cache off" in caplog.text
    _equal(cache.prompts([1, 2, 0], lambda ks: [images[k] for k in ks]), odd.prompts([images[k] for k in (1, 2, 0)]))
