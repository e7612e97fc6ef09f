"""A tiny Qwen2.5-VL of the real classes, built locally, so CPU runs and tests need no download.

Random weights (seeded), a character-level tokenizer trained on the training captions with the
Qwen chat/vision special tokens, the real image processor at a fixed small resolution, and a
Qwen-style chat template. `save_pretrained` writes a directory that loads through the very same
`ecomcap.modeling.load` path as `Qwen/Qwen2.5-VL-3B-Instruct`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ecomcap.config import TinyModelConfig
from ecomcap.modeling.processor import ImageOnlyQwenProcessor, load_processor, save_processor

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<|unk|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKER = "ecomcap_tiny.json"


def char_tokenizer_model(texts: Iterable[str], specials: list[str], unk: str, extra: str = "") -> Tokenizer:
    """Character-level `tokenizers` model: every character seen in `texts`, printable ASCII,
    `extra`, then `specials` first in the vocabulary (shared by the tiny captioner and encoders)."""
    chars = set(chr(c) for c in range(32, 127)) | {"\n"} | set(extra)
    for t in texts:
        chars.update(t)
    vocab = {tok: i for i, tok in enumerate(specials + sorted(chars - set("\r") - set(specials)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    return tk


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: every character seen in `texts`, printable ASCII, specials."""
    tk = char_tokenizer_model(texts, SPECIAL_TOKENS, "<|unk|>", extra=CHAT_TEMPLATE)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|unk|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_config(cfg: TinyModelConfig, tok) -> Qwen2_5_VLConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.text_hidden // cfg.text_heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2 (temporal, height, width)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text = dict(
        vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
        num_heads=cfg.vision_heads, out_hidden_size=cfg.text_hidden, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=list(range(cfg.vision_depth - 1, -1, -2))[::-1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], cfg: TinyModelConfig | None = None) -> Path:
    """Write a loadable tiny model directory (safetensors + processor + chat template)."""
    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts)
    pixels = cfg.image_size * cfg.image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = ImageOnlyQwenProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(cfg, tok))
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
    (out / MARKER).write_text(json.dumps(cfg.model_dump(), indent=2), encoding="utf-8")
    return out


def ensure_tiny_model(out_dir: str | Path, texts: Iterable[str], cfg: TinyModelConfig) -> Path:
    """Build the tiny model once per settings; reuse an existing directory built the same way. Its
    vocabulary comes from the captions it was first built from: captions with characters it lacks
    (the hard set's 袖, 领 after the easy set) are said in one warning - those characters can never
    be generated. It is not rebuilt: trained adapters name it as their base."""
    out, texts = Path(out_dir), list(texts)
    marker = out / MARKER
    if not (marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == cfg.model_dump()):
        return build_tiny_model(out, texts, cfg)
    vocab = load_processor(out).tokenizer.get_vocab()
    missing = sorted(ch for ch in set("".join(texts)) if ch not in vocab)
    if missing:
        log.warning("the tiny model at %s was built from other captions: %d characters of these (%s) are not in "
                    "its vocabulary and can never be generated; point model.name_or_path at a new directory",
                    out, len(missing), "".join(missing[:12]))
    return out
