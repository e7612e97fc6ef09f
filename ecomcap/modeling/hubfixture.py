"""A local checkpoint in the exact file layout of the hub's `Qwen/Qwen2.5-VL-*-Instruct`.

Nothing can be downloaded here, yet the real-model path must be proven. `build_hub_checkpoint`
writes, deterministically, what a downloaded `Qwen/Qwen2.5-VL-3B-Instruct` directory holds:
`config.json` (the release's flat format), `model.safetensors` (random bf16 weights under the
release's tensor names: `model.layers.*`, `visual.*`), the real Qwen2.5 BPE tokenizer
(`tokenizer.json`, `vocab.json`, `merges.txt`, `tokenizer_config.json`), `chat_template.json`,
`preprocessor_config.json` and Qwen's published `generation_config.json`. Width and depth are
parameters (`HubArch`): tests use a tiny width with the real 151,936-token vocabulary; the
memory benchmark uses the full 3B width with one or two decoder layers.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ecomcap.modeling.qwen_bpe import SPECIAL_START, write_qwen_tokenizer

IDS = dict(bos=151643, eos=151645, pad=151643, vision_start=151652, vision_end=151653,
           vision_pad=151654, image=151655, video=151656)
MARKER = "ecomcap_hubfixture.json"

# Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json, as released
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
# Qwen's published generation_config.json: near-greedy sampling that `generate` merges into
# every call unless the caller sets each field (see `ecomcap.inference.generate`)
GENERATION = {
    "bos_token_id": IDS["bos"], "pad_token_id": IDS["pad"], "do_sample": True,
    "eos_token_id": [IDS["eos"], IDS["bos"]], "repetition_penalty": 1.05, "temperature": 0.1,
    "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0",
}


@dataclass(frozen=True)
class HubArch:
    """The knobs of Qwen2.5-VL's config.json that set size (defaults: the 3B release)."""

    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    vision_heads: int = 16
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    seed: int = 0

    def reduced(self, **kw) -> "HubArch":
        return replace(self, **kw)


QWEN25_VL_3B = HubArch()
QWEN25_VL_7B = HubArch(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vision_intermediate=3420,
                       tie_word_embeddings=False)
# tests: the real vocabulary and token ids, a width that runs in seconds on a CPU
TEST_ARCH = HubArch(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, vision_depth=2, vision_hidden=32,
                    vision_intermediate=64, vision_heads=2, max_position_embeddings=4096)


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen's [16, 24, 24] for head_dim 128, scaled to other head sizes (sums to head_dim/2)."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def hub_config(arch: HubArch) -> dict:
    """config.json in the release's flat layout (text fields at the top, vision nested)."""
    head_dim = arch.hidden_size // arch.num_attention_heads
    depth = arch.vision_depth
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": IDS["bos"], "eos_token_id": IDS["eos"],
        "vision_start_token_id": IDS["vision_start"], "vision_end_token_id": IDS["vision_end"],
        "vision_token_id": IDS["vision_pad"], "image_token_id": IDS["image"],
        "video_token_id": IDS["video"], "hidden_act": "silu", "hidden_size": arch.hidden_size,
        "initializer_range": 0.02, "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings, "max_window_layers": 70,
        "num_attention_heads": arch.num_attention_heads, "num_hidden_layers": arch.num_hidden_layers,
        "num_key_value_heads": arch.num_key_value_heads, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": arch.tie_word_embeddings, "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0", "use_cache": True, "use_sliding_window": False,
        "vision_config": {
            "depth": depth, "hidden_act": "silu", "hidden_size": arch.vision_hidden,
            "intermediate_size": arch.vision_intermediate, "num_heads": arch.vision_heads,
            "in_chans": 3, "out_hidden_size": arch.hidden_size, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            # the release: full attention in every 8th block (7, 15, 23, 31)
            "fullatt_block_indexes": [i for i in range(depth) if i % 8 == 7] or [depth - 1],
            "tokens_per_second": 2, "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        "vocab_size": arch.vocab_size,
    }


def hub_tensor_name(name: str) -> str:
    """transformers 5 parameter name -> the release's safetensors name."""
    name = re.sub(r"^model\.language_model\.", "model.", name)
    return re.sub(r"^model\.visual\.", "visual.", name)


def _write_weights(arch: HubArch, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_dict(hub_config(arch))
    torch.manual_seed(arch.seed)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to_empty(device="cpu")
    state = {}
    gen = torch.Generator().manual_seed(arch.seed)
    for name, p in model.state_dict().items():
        key = hub_tensor_name(name)
        if arch.tie_word_embeddings and key == "lm_head.weight":
            continue  # the release stores tied embeddings once
        if name.endswith("norm.weight") or ".norm" in name and name.endswith(".weight") and p.dim() == 1:
            t = torch.ones(p.shape)
        elif p.dim() == 1:
            t = torch.zeros(p.shape)
        else:
            t = torch.randn(p.shape, generator=gen) * 0.02
        state[key] = t.to(torch.bfloat16).contiguous()
    del model
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def build_hub_checkpoint(out_dir: str | Path, arch: HubArch = TEST_ARCH) -> Path:
    """Write (or reuse, when built with the same `arch`) a hub-layout Qwen2.5-VL directory."""
    out = Path(out_dir)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == asdict(arch):
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_qwen_tokenizer(out)
    files = {"config.json": hub_config(arch), "generation_config.json": GENERATION,
             "preprocessor_config.json": PREPROCESSOR, "chat_template.json": {"chat_template": CHAT_TEMPLATE}}
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    _write_weights(arch, out)
    marker.write_text(json.dumps(asdict(arch)), encoding="utf-8")
    assert IDS["bos"] == SPECIAL_START
    return out
