"""Tiny random-init dual encoders of the real transformers classes, built locally.

ChineseCLIPModel, CLIPModel and SiglipModel each get a few-layer config, the project's
character tokenizer (with [CLS] ... [SEP] around every text, so CLIP's EOS pooling and
Chinese-CLIP's [CLS] pooling both find their token) and the class's own PIL image processor.
`save_pretrained` writes a directory that loads through the same `ecomcap.retrieval.model.encoder`
path as `OFA-Sys/chinese-clip-vit-base-patch16` or `google/siglip-base-patch16-224`.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import processors
from transformers import (
    ChineseCLIPConfig,
    ChineseCLIPModel,
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
    ChineseCLIPImageProcessorPil,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from ecomcap.config_encoders import Arch, TinyEncoderConfig
from ecomcap.modeling.tiny import char_tokenizer_model

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
MARKER = "ecomcap_tiny_encoder.json"
MODEL_CLASSES = {"chinese_clip": ChineseCLIPModel, "clip": CLIPModel, "siglip": SiglipModel}


def build_char_tokenizer(texts: Iterable[str], max_len: int) -> PreTrainedTokenizerFast:
    """Character tokenizer that wraps each text as ``[CLS] text [SEP]``."""
    tk = char_tokenizer_model(texts, SPECIALS, "[UNK]")
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]", model_max_length=max_len,
    )


def _config(arch: Arch, cfg: TinyEncoderConfig, tok: PreTrainedTokenizerFast, max_len: int,
            text_sizes: dict | None = None):
    width = dict(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                 num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads)
    vision = dict(width, image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = {**dict(width, vocab_size=len(tok), max_position_embeddings=max(max_len, 16),
                   pad_token_id=tok.pad_token_id), **(text_sizes or {})}
    if arch == "chinese_clip":
        return ChineseCLIPConfig(text_config=dict(text, type_vocab_size=2), vision_config=vision,
                                 projection_dim=cfg.projection_dim)
    text.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if arch == "clip":
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    # SigLIP has no vision projection: both towers end at `hidden` (projection_dim unused)
    return SiglipConfig(text_config=text, vision_config=vision)


def _image_processor(arch: Arch, size: int):
    if arch == "siglip":
        return SiglipImageProcessorPil(size={"height": size, "width": size})
    cls = ChineseCLIPImageProcessorPil if arch == "chinese_clip" else CLIPImageProcessorPil
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_tiny_encoder(out_dir: str | Path, arch: Arch, texts: Iterable[str],
                       cfg: TinyEncoderConfig | None = None, max_len: int = 52, text_sizes: dict | None = None) -> Path:
    """Write a loadable tiny dual encoder (safetensors, tokenizer, image processor); `text_sizes`
    overrides the text tower's config (the load benchmark's real-width text tower)."""
    cfg, texts = cfg or TinyEncoderConfig(), list(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(texts, max_len)
    torch.manual_seed(cfg.seed)
    model = MODEL_CLASSES[arch](_config(arch, cfg, tok, max_len, text_sizes))
    if arch == "siglip":  # transformers' _init_weights zeroes both; SigLIP trains from log 10, -10
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _image_processor(arch, cfg.image_size).save_pretrained(out)
    (out / MARKER).write_text(json.dumps(_marker(arch, cfg, texts, max_len), indent=2), encoding="utf-8")
    return out


def _marker(arch: Arch, cfg: TinyEncoderConfig, texts: list[str], max_len: int) -> dict:
    """What the built directory depends on: class, sizes, text length and the vocabulary (the
    character set of `texts`), so new data with new characters rebuilds rather than reusing
    a tokenizer that maps them to [UNK]."""
    chars = "".join(sorted(set("".join(texts))))
    vocab = hashlib.sha256(chars.encode("utf-8")).hexdigest()[:16]
    return {"arch": arch, **cfg.model_dump(), "max_len": max_len, "vocab": vocab}


def ensure_tiny_encoder(out_dir: str | Path, arch: Arch, texts: Iterable[str], cfg: TinyEncoderConfig,
                        max_len: int = 52) -> Path:
    """Build once per settings; reuse a directory built the same way."""
    marker, texts = Path(out_dir) / MARKER, list(texts)
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == _marker(arch, cfg, texts, max_len):
        return Path(out_dir)
    return build_tiny_encoder(out_dir, arch, texts, cfg, max_len)
