"""What loads for the GPU path: QLoRA keeps the vision tower (and its merger) 16-bit (the skip list
against the real module names of Qwen2.5-VL in this transformers and in the older `visual.` layout,
and a real 4-bit load on bitsandbytes' CPU backend with the census that refuses a quantised vision
tower); attention chosen per sub-model."""
import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.quantizers.quantizers_utils import should_convert_module

from ecomcap.errors import EcomcapError
from ecomcap.modeling.strategies import (
    KEEP_16BIT,
    bnb_4bit_config,
    check_vision_16bit,
    quantized_vision_modules,
)


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_the_skip_list_matches_this_and_the_older_layout(hub_checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(hub_checkpoint)
    names = _linear_names(model)
    vision = [n for n in names if ".visual." in f".{n}"]
    assert vision and any(".merger." in n for n in vision)
    older = [n.removeprefix("model.") for n in vision]  # 4.x names: `visual.blocks.N...`
    assert not any(should_convert_module(n, KEEP_16BIT) for n in vision + older + ["lm_head"])
    lm = [n for n in names if "language_model" in n]
    assert lm and all(should_convert_module(n, KEEP_16BIT) for n in lm)  # the language model is quantised
    assert all(should_convert_module(n, ["visual", "lm_head"]) for n in vision)  # (the list before the fix)


def test_a_4bit_load_keeps_the_vision_tower_16bit(hub_checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(
        hub_checkpoint, quantization_config=bnb_4bit_config(), dtype=torch.bfloat16, device_map={"": "cpu"})
    four = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert four and all("language_model" in n for n in four)
    assert quantized_vision_modules(model) == []
    check_vision_16bit(model)
    old = bnb_4bit_config()
    old.llm_int8_skip_modules = ["visual", "lm_head"]  # the skip list before the fix
    bad = AutoModelForImageTextToText.from_pretrained(
        hub_checkpoint, quantization_config=old, dtype=torch.bfloat16, device_map={"": "cpu"})
    assert quantized_vision_modules(bad)
    with pytest.raises(EcomcapError, match="quantised .* vision-tower modules"):
        check_vision_16bit(bad)


def test_attention_is_chosen_per_sub_model(hub_checkpoint, monkeypatch):
    """flash-attn (CUDA-only, not installable here: its presence is faked by name) gives the vision
    tower flash-attention varlen and the text decoder sdpa; the per-sub-model form loads as such."""
    import importlib.util

    from ecomcap.config import ModelConfig
    from ecomcap.modeling.load import pick_attention

    assert pick_attention(ModelConfig(), torch.bfloat16) == "sdpa"  # not installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    chosen = pick_attention(ModelConfig(), torch.bfloat16)
    assert chosen["vision_config"] == "flash_attention_2" and chosen["text_config"] == "sdpa"
    assert pick_attention(ModelConfig(), torch.float32) == "sdpa"  # flash-attention needs 16-bit
    packed = pick_attention(ModelConfig(), torch.bfloat16, packed=True)  # varlen keeps packed examples apart
    assert packed["text_config"] == packed["vision_config"] == "flash_attention_2"
    assert pick_attention(ModelConfig(attn_implementation="eager"), torch.bfloat16) == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    model = AutoModelForImageTextToText.from_pretrained(  # the same form, with kernels that run on CPU
        hub_checkpoint, attn_implementation={**chosen, "vision_config": "eager"})
    assert model.config.vision_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "sdpa"
