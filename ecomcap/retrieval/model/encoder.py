"""The encoder API other parts (vector store, search page, reranker) use:

    enc = load_encoder(model_dir)
    enc.encode_texts(["红色 连衣裙"])      # float32 [n, D], L2-normalised
    enc.encode_images([pil_image])         # float32 [n, D], L2-normalised
    enc.encode_items(images, texts)        # the item embedding the model was trained for

`model_dir` is an exported encoder (``save_encoder``), a tiny model directory or a hub id of a
Chinese-CLIP / CLIP / SigLIP checkpoint. trust_remote_code stays off unless asked for. A pretrained
tokenizer that cannot read Chinese queries is refused when it loads (``vocab_check``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from ecomcap.config_encoders import MAX_UNKNOWN_SHARE
from ecomcap.retrieval.model.dual import SETTINGS, DualEncoder, load_dual_encoder
from ecomcap.retrieval.model.tiny import MARKER as TINY_MARKER
from ecomcap.retrieval.model.vocab_check import check_vocabulary


class Preprocessor:
    """Texts -> token tensors, PIL images -> pixel tensors, the way the model family expects."""

    def __init__(self, tokenizer, image_processor, arch: str, max_len: int, vocab_from_data: bool = False):
        self.tokenizer, self.image_processor, self.arch, self.max_len = tokenizer, image_processor, arch, max_len
        self.vocab_from_data = vocab_from_data  # a tiny model's characters: exports skip the vocabulary check

    def texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP pools the last position and was trained on max-length padding
        padding = "max_length" if self.arch == "siglip" else True
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids") if self.arch == "chinese_clip" else (
            "input_ids", "attention_mask")
        return {k: v for k, v in enc.items() if k in keep}

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def save(self, out: Path) -> None:
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)


def vocab_from_data(path: str | Path) -> bool:
    """A tiny model's tokenizer (or an export of one): its characters come from the run's own
    texts, so sample queries from another domain say nothing about it."""
    settings = Path(path) / SETTINGS
    return (Path(path) / TINY_MARKER).is_file() or (
        settings.is_file() and bool(json.loads(settings.read_text(encoding="utf-8")).get("vocab_from_data")))


def load_preprocessor(path: str | Path, arch: str, max_len: int, trust_remote_code: bool = False,
                      max_unknown_share: float | None = MAX_UNKNOWN_SHARE) -> Preprocessor:
    """The checkpoint's tokenizer and image processor; a pretrained vocabulary that maps more than
    `max_unknown_share` of sample Chinese queries to unknown ids is refused (None: unchecked)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    from_data = vocab_from_data(path)
    if max_unknown_share is not None and not from_data:
        check_vocabulary(tok, str(path), max_unknown_share)
    ip = AutoImageProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    size = getattr(ip, "size", None) or {}
    if not getattr(ip, "do_center_crop", True) and "shortest_edge" in size:
        # Chinese-CLIP's released config (do_center_crop false, "size": 224) means its own square
        # resize without a crop; a shortest-edge resize would give non-square pixels the model rejects
        ip.size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
    return Preprocessor(tok, ip, arch, max_len, vocab_from_data=from_data)


def fuse(image_emb: torch.Tensor, text_emb: torch.Tensor, weight: float) -> torch.Tensor:
    """Normalised weighted sum: the fused item embedding (weight = image share)."""
    return F.normalize(weight * image_emb + (1.0 - weight) * text_emb, dim=-1)


class Encoder:
    """Inference wrapper: batched, no-grad, numpy out."""

    def __init__(self, dual: DualEncoder, pre: Preprocessor, settings: dict[str, Any], device: str = "cpu",
                 batch_size: int = 64):
        self.dual, self.pre, self.settings = dual.eval().to(device), pre, settings
        self.device, self.batch_size = device, batch_size

    @property
    def item_embedding(self) -> str:
        return self.settings.get("item_embedding", "image")

    @property
    def fusion_weight(self) -> float:
        return float(self.settings.get("fusion_weight", 0.5))

    @torch.no_grad()
    def _batched(self, items: Sequence, fn) -> np.ndarray:
        out = [fn(items[i:i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.dual.embed_text({k: v.to(self.device) for k, v in self.pre.texts(["a"]).items()}).shape[-1])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._batched(list(texts), lambda b: self.dual.embed_text(
            {k: v.to(self.device) for k, v in self.pre.texts(b).items()}))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._batched(list(images), lambda b: self.dual.embed_image(self.pre.images(b).to(self.device)))

    def encode_items(self, images: Sequence[Image.Image], texts: Sequence[str], mode: str | None = None,
                     weight: float | None = None) -> np.ndarray:
        """Item embeddings as image, text or fused (default: the settings saved with the model)."""
        mode = mode or self.item_embedding
        if mode == "image":
            return self.encode_images(images)
        if mode == "text":
            return self.encode_texts(texts)
        img = torch.from_numpy(self.encode_images(images))
        txt = torch.from_numpy(self.encode_texts(texts))
        return fuse(img, txt, self.fusion_weight if weight is None else weight).numpy().astype(np.float32)


def save_encoder(dual: DualEncoder, pre: Preprocessor, out_dir: str | Path, **settings: Any) -> Path:
    """A loadable encoder directory: full safetensors weights (LoRA merged), processors, settings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = dual.model
    if hasattr(model, "merge_and_unload"):  # a LoRA-wrapped model: ship merged weights
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    pre.save(out)
    data = {**dual.settings(), "max_text_len": pre.max_len, **({"vocab_from_data": True} if pre.vocab_from_data else {}),
            **settings}
    (out / SETTINGS).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def load_encoder(model_dir: str | Path, device: str | None = None, trust_remote_code: bool = False,
                 max_unknown_share: float | None = MAX_UNKNOWN_SHARE) -> Encoder:
    """The `Encoder` of an exported/tiny model directory or a hub id."""
    dual = load_dual_encoder(model_dir)
    path = Path(model_dir) / SETTINGS
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"arch": dual.arch}
    positions = dual.model.config.text_config.max_position_embeddings
    max_len = min(int(settings.get("max_text_len", 64 if dual.arch == "siglip" else 52)), positions)
    pre = load_preprocessor(model_dir, dual.arch, max_len, trust_remote_code, max_unknown_share)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Encoder(dual, pre, settings, device)
