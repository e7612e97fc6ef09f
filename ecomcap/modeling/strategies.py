"""Fine-tuning strategies: which parameters train (one config field, `FinetuneConfig.strategy`).

- lora: LoRA on the language model's projections (optionally the vision tower too)
- qlora: 4-bit nf4 base (vision tower kept 16-bit) + LoRA; CUDA only
- partial: language-model layers i..j train, everything else frozen (the ad-caption solution)
- freeze_llm: language model frozen; the vision-language merger trains (+ vision tower optionally)
- full: everything trains
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from ecomcap.config import FinetuneConfig
from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)

LM_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")
VISION = re.compile(r"(?:^|\.)visual\.")
MERGER = re.compile(r"(?:^|\.)visual\.merger\.")


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable {self.trainable:,} / {self.total:,} parameters ({share:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParamCount:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return ParamCount(trainable, total)


def quantization_config(cfg: FinetuneConfig):
    """BitsAndBytes 4-bit config for QLoRA; a clear error where it cannot run."""
    if cfg.strategy != "qlora":
        return None
    if not torch.cuda.is_available():
        raise EcomcapError(
            "strategy 'qlora' needs a CUDA GPU (bitsandbytes 4-bit); on CPU use 'lora' or 'full'"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise EcomcapError("strategy 'qlora' needs bitsandbytes: pip install -e '.[gpu]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["visual", "lm_head"],  # 4-bit vision layers ruin captions
    )


def lora_target_regex(cfg: FinetuneConfig) -> str:
    """Module-name regex for LoRA: language-model projections (+ vision blocks if asked)."""
    names = "|".join(re.escape(t) for t in cfg.lora_targets)
    lm = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    if not cfg.lora_vision:
        return lm
    return rf"({lm})|(.*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.({names})))"


def _freeze_all_but(model: torch.nn.Module, keep) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))


def apply_strategy(model: torch.nn.Module, cfg: FinetuneConfig) -> tuple[torch.nn.Module, ParamCount]:
    """Make exactly the strategy's parameters trainable; returns (model, counts)."""
    if cfg.strategy in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.strategy == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=lora_target_regex(cfg), bias="none",
        )
        model = get_peft_model(model, lora)
    elif cfg.strategy == "partial":
        lo, hi = cfg.partial_layers
        n_layers = sum(1 for n, _ in model.named_modules() if re.search(r"language_model\.layers\.\d+$", n))
        if not 0 <= lo <= hi < n_layers:
            raise EcomcapError(f"partial_layers {lo}..{hi} outside the model's 0..{n_layers - 1} layers")

        def keep(name: str) -> bool:
            m = LM_LAYER.search(name)
            return m is not None and lo <= int(m.group(1)) <= hi

        _freeze_all_but(model, keep)
    elif cfg.strategy == "freeze_llm":
        _freeze_all_but(model, lambda n: bool(MERGER.search(n) or (cfg.train_vision and VISION.search(n))))
    elif cfg.strategy == "full":
        _freeze_all_but(model, lambda n: True)
    counts = count_parameters(model)
    if counts.trainable == 0:
        raise EcomcapError(f"strategy {cfg.strategy!r} left no trainable parameters")
    log.info("strategy %s: %s", cfg.strategy, counts)
    return model, counts
