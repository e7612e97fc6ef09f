"""Prefill once per image: the same beams, scores and samples as stock `generate`, on prompts whose
image token counts differ (left padding, different 3D mRoPE deltas per row)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ecomcap.config import FinetuneConfig, GenerateConfig
from ecomcap.inference.decode import generate
from ecomcap.inference.generate import caption_images, generate_kwargs
from ecomcap.inference.prefill import expand_size
from ecomcap.modeling.load import load_base
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.collate import PromptBuilder

SIZES = [(112, 112), (200, 150), (60, 90), (224, 224), (140, 84)]


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _model(tiny_model_cfg, lora=False):
    """The tiny test model with perturbed weights (random init gives near-uniform, repetitive
    captions; perturbed, every row decodes differently), at variable image resolution."""
    model, processor = load_base(tiny_model_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if lora:
        model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=4))
    model.eval()
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    return model, PromptBuilder(processor, tiny_model_cfg.prompt)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=0, atol=1e-4)
    for x, y in zip(a.scores, b.scores, strict=True):
        finite = torch.isfinite(x)
        assert torch.equal(finite, torch.isfinite(y))
        torch.testing.assert_close(x[finite], y[finite], rtol=0, atol=1e-4)


def test_beam_search_prefilled_once_equals_stock_on_mixed_image_sizes(tiny_model_cfg):
    model, pb = _model(tiny_model_cfg)
    enc = pb.prompts(_images())
    assert len(set(enc["attention_mask"].sum(1).tolist())) == len(SIZES)  # token counts all differ
    kw = dict(generate_kwargs(GenerateConfig(num_beams=3, max_new_tokens=10, length_penalty=0.8), pb),
              return_dict_in_generate=True, output_scores=True)
    hf, once = generate(model, enc, "hf", **kw), generate(model, enc, "once", **kw)
    _assert_same(hf, once)
    new = hf.sequences[:, enc["input_ids"].shape[1]:]
    assert len({tuple(r) for r in new.tolist()}) == len(SIZES)  # the rows really differ


def test_beam_search_prefilled_once_without_padding(tiny_model_cfg):
    """Same-size images: no padding, so `generate` drops the all-ones mask; still the same."""
    model, pb = _model(tiny_model_cfg)
    enc = pb.prompts(_images([(150, 100)] * 3))
    kw = dict(generate_kwargs(GenerateConfig(num_beams=4, max_new_tokens=8), pb),
              return_dict_in_generate=True, output_scores=True)
    _assert_same(generate(model, enc, "hf", **kw), generate(model, enc, "once", **kw))


@pytest.mark.parametrize("lora", [False, True])
def test_samples_identical_for_a_fixed_seed(tiny_model_cfg, lora):
    """The K samples of an SCST rollout (LoRA-wrapped policy as in SCST) do not change."""
    model, pb = _model(tiny_model_cfg, lora=lora)
    enc = pb.prompts(_images())
    kw = generate_kwargs(GenerateConfig(num_beams=1, do_sample=True, max_new_tokens=10, top_k=50), pb)
    outs = []
    for mode in ("hf", "once"):
        torch.manual_seed(7)
        outs.append(generate(model, enc, mode, num_return_sequences=4, **kw))
    assert outs[0].shape[0] == 4 * len(SIZES)
    assert torch.equal(outs[0], outs[1])


def test_caption_images_uses_the_configured_path(tiny_model_cfg):
    model, pb = _model(tiny_model_cfg)
    images = _images()
    cfg = GenerateConfig(num_beams=3, max_new_tokens=10, batch_size=5)
    once = caption_images(model, pb, images, cfg, progress=False)
    assert once == caption_images(model, pb, images, cfg.model_copy(update={"prefill": "hf"}), progress=False)
    assert len(set(once)) > 1


T523_NAMES = ["past_key_values", "cache_params", "state", "mems", "past_buckets_states"]  # 5.23's ALL_CACHE_NAMES


def test_prefill_once_passes_the_cache_under_the_name_the_installed_transformers_takes(tiny_model_cfg,
                                                                                        monkeypatch):
    """transformers 5.23 and older take a cache only as `past_key_values` and reject
    `cache` ("model_kwargs not used"). Simulated here on the installed version: its cache names are
    swapped for 5.23's while the kwarg is chosen, and `generate` is wrapped to reject what 5.23 rejects."""
    from transformers.generation import utils

    model, pb = _model(tiny_model_cfg)
    enc = pb.prompts(_images(SIZES[:3]))
    kw = dict(generate_kwargs(GenerateConfig(num_beams=3, max_new_tokens=6), pb),
              return_dict_in_generate=True, output_scores=True)
    want = generate(model, enc, "hf", **kw)
    real, names = model.generate, utils.ALL_CACHE_NAMES
    seen = []

    def generate_523(**kwargs):
        seen.append(set(kwargs) & {"cache", "past_key_values"})
        if "cache" in kwargs:
            raise ValueError("The following `model_kwargs` are not used by the model: ['cache']")
        monkeypatch.setattr(utils, "ALL_CACHE_NAMES", names)  # the real (5.24+) generate runs on its own names
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", generate_523)
    monkeypatch.setattr(utils, "ALL_CACHE_NAMES", T523_NAMES)
    _assert_same(want, generate(model, enc, "once", **kw))
    assert seen == [{"past_key_values"}]


class _Work:
    """Counts what goes through the language model (tokens) and the vision tower (calls, images)."""

    def __init__(self, model):
        from ecomcap.inference.prefill import generative_model

        inner = generative_model(model).model
        self.lm_tokens = self.vision_calls = self.images = 0
        self.hooks = [inner.language_model.register_forward_hook(self._lm, with_kwargs=True),
                      inner.visual.register_forward_hook(self._vision, with_kwargs=True)]

    def _lm(self, module, args, kwargs, out):
        self.lm_tokens += kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]

    def _vision(self, module, args, kwargs, out):
        self.vision_calls += 1
        self.images += (kwargs.get("grid_thw") if "grid_thw" in kwargs else args[1]).shape[0]

    def close(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("extra", [dict(num_beams=5), dict(num_beams=1, do_sample=True, num_return_sequences=4)])
def test_prefill_once_runs_the_prompt_once_per_image(tiny_model_cfg, extra):
    """The point of the change: the language model sees each prompt once, not once per beam/sample,
    and the vision tower encodes each image once."""
    model, pb = _model(tiny_model_cfg)
    enc = pb.prompts(_images())
    kw = {**generate_kwargs(GenerateConfig(num_beams=extra["num_beams"], max_new_tokens=8), pb), **extra}
    work = {}
    for mode in ("hf", "once"):
        w = _Work(model)
        torch.manual_seed(0)
        generate(model, enc, mode, **kw)
        w.close()
        work[mode] = w
    n, prompt = expand_size(kw), int(enc["attention_mask"].shape[0] * enc["input_ids"].shape[1])
    assert work["hf"].lm_tokens >= n * prompt  # stock: every prompt n times over
    assert work["once"].lm_tokens < work["hf"].lm_tokens - (n - 1) * prompt * 0.9
    assert work["once"].lm_tokens <= prompt + n * len(SIZES) * 8  # prompts once, then one token per beam and step
    assert (work["once"].vision_calls, work["once"].images) == (1, len(SIZES))


def test_scst_rollouts_use_the_configured_prefill(tiny_model_cfg, small_data, tmp_path, monkeypatch):
    """SCST samples (and greedy baselines) through `generate.prefill` of the run config (a spy
    around the real function records the mode)."""
    from ecomcap.config import SCSTConfig
    from ecomcap.training import sampling, scst

    modes = []
    real = sampling.generate

    def spy(model, enc, mode="once", **kw):
        modes.append(mode)
        return real(model, enc, mode, **kw)

    monkeypatch.setattr(sampling, "generate", spy)  # SCST's (and DPO's) sampler
    cfg = SCSTConfig(output_dir=tmp_path / "scst", max_steps=1, batch_size=2, samples=2, eval_every=0,
                     save_every=0, max_new_tokens=4, finetune=FinetuneConfig(strategy="lora", lora_r=4))
    scst.run_scst(tiny_model_cfg.name_or_path, small_data["train"], None, tiny_model_cfg, cfg,
                  GenerateConfig(num_beams=1, max_new_tokens=4, prefill="hf"))
    assert modes and set(modes) == {"hf"}


def test_a_checkpoint_asking_for_a_static_cache_keeps_the_stock_path(tiny_model_cfg):
    """generation_config.json with `cache_implementation: static`: `generate` refuses a passed cache,
    so prefill once falls back to the stock call (same beams) instead of raising."""
    model, pb = _model(tiny_model_cfg)
    enc = pb.prompts(_images(SIZES[:2]))
    kw = dict(generate_kwargs(GenerateConfig(num_beams=2, max_new_tokens=5), pb),
              return_dict_in_generate=True, output_scores=True)
    model.generation_config.cache_implementation = "static"
    _assert_same(generate(model, enc, "hf", **kw), generate(model, enc, "once", **kw))
