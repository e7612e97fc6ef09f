"""Fine-tuning strategies: which parameters train (one config field, `FinetuneConfig.strategy`).

- lora: LoRA on the language model's projections (optionally the vision tower too)
- qlora: 4-bit nf4 language model (vision tower, embeddings, head kept bf16) + LoRA; CUDA only
- partial: language-model layers i..j (or the upper half) train, the rest frozen (ad-caption)

Trainable parameters are kept in fp32 whatever the load dtype; the loop runs bf16 autocast.
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
    for p in model.parameters():  # (a ZeRO-3 partitioned parameter's own numel is its shard: 0)
        n = getattr(p, "ds_numel", None) or p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
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
    except ImportError:
        raise EcomcapError("strategy 'qlora' needs bitsandbytes: pip install -e '.[gpu]'") from None
    return bnb_4bit_config()


# Modules QLoRA keeps 16-bit. transformers 5 skips a module when a pattern matches its full name
# from the start (up to a module boundary) or as a suffix; 4.x when it is a substring. Qwen2.5-VL's
# vision tower is `model.visual.` in 5.x and `visual.` in 4.x layouts: both are named.
KEEP_16BIT = ["visual", "model.visual", "lm_head"]


def bnb_4bit_config():
    """nf4, double-quantised, bf16 compute; the vision tower (with its merger) and head stay 16-bit
    (4-bit vision layers ruin captions); nothing is upcast to fp32 but the LoRA weights (see
    `freeze_for_kbit`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(KEEP_16BIT),
    )


def quantized_vision_modules(model: torch.nn.Module) -> list[str]:
    """Names of 4-bit (bitsandbytes) modules under the vision tower or its merger."""
    return [name for name, module in model.named_modules()
            if VISION.search(name + ".") and type(module).__name__ in ("Linear4bit", "Linear8bitLt")]


def check_vision_16bit(model: torch.nn.Module) -> None:
    """Refuse a QLoRA base whose vision tower was quantised (a skip list this transformers does
    not match): its captions would be trained and served over 4-bit vision features."""
    bad = quantized_vision_modules(model)
    if bad:
        raise EcomcapError(f"QLoRA quantised {len(bad)} vision-tower modules (e.g. {bad[0]}): the 4-bit skip "
                           f"list {KEEP_16BIT} does not match this transformers' module names")


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


def layer_range(spec, n_layers: int) -> tuple[int, int]:
    """Resolve `partial_layers` against the loaded model's depth (inclusive indices)."""
    if spec == "upper_half":
        return n_layers // 2, n_layers - 1
    if spec == "lower_half":
        return 0, n_layers // 2 - 1
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise EcomcapError(f"partial_layers fraction {spec} must be in (0, 1]")
        return n_layers - max(1, round(spec * n_layers)), n_layers - 1
    lo, hi = (i + n_layers if i < 0 else i for i in spec)
    if not 0 <= lo <= hi < n_layers:
        raise EcomcapError(
            f"partial_layers {list(spec)} is outside the model's layers 0..{n_layers - 1} "
            f"({n_layers} layers): use e.g. upper_half or [{n_layers // 2}, {n_layers - 1}]")
    return lo, hi


def count_lm_layers(model: torch.nn.Module) -> int:
    return sum(1 for n, _ in model.named_modules() if re.search(r"language_model\.layers\.\d+$", n))


def upcast_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters in fp32 (frozen ones stay 16-bit): an update below bf16 resolution
    (~0.4% of the weight) would otherwise be rounded away. Returns how many were cast."""
    n = 0
    for p in model.parameters():
        # (not ZeRO-3 partitioned parameters, loaded under zero.Init: DeepSpeed keeps fp32 masters)
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) and not hasattr(p, "ds_id"):
            model.__dict__.setdefault(LOAD_DTYPE, p.dtype)  # exports go back to it
            p.data = p.data.float()
            n += 1
    return n


LOAD_DTYPE = "_ecomcap_load_dtype"


def load_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The 16-bit dtype the weights were loaded in, when `upcast_trainable` raised some to fp32."""
    return model.__dict__.get(LOAD_DTYPE)


def is_4bit(model: torch.nn.Module) -> bool:
    """Whether the language model's weights are bitsandbytes 4-bit (QLoRA's base)."""
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def freeze_for_kbit(model: torch.nn.Module) -> torch.nn.Module:
    """What QLoRA needs from `prepare_model_for_kbit_training`, without its upcast of every
    16-bit parameter (vision tower, embeddings, head) to fp32: +3.5 GB on 7B for nothing.
    Refuses an unquantised model: LoRA over it would be trained, recorded as QLoRA, and then
    evaluated over a 4-bit base."""
    if not is_4bit(model):
        raise EcomcapError("strategy 'qlora' needs the base loaded in 4-bit (load_base with "
                           "quantization_config(finetune)); this model is not quantised: use 'lora'")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (non-reentrant: the trainable weights inside a block get
    their gradients even when the block's input carries none; see `drop_input_grad_hooks`)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    drop_input_grad_hooks(model)  # before peft adds its own (it would overwrite the handles)
    model.config.use_cache = False


def drop_input_grad_hooks(model: torch.nn.Module) -> None:
    """transformers 5.x (on enabling checkpointing) and peft (on wrapping a checkpointed model)
    call `enable_input_require_grads`, which hooks every submodel's input embeddings, the vision
    patch embedding too: the frozen vision tower and frozen lower layers would then run in
    backward. Only reentrant checkpointing needs those hooks; ours is non-reentrant."""
    for module in model.modules():
        if getattr(module, "_require_grads_hooks", None):
            module.disable_input_require_grads()


def apply_strategy(model: torch.nn.Module, cfg: FinetuneConfig) -> tuple[torch.nn.Module, ParamCount]:
    """Make exactly the strategy's parameters trainable (fp32); returns (model, counts)."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.strategy in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if cfg.strategy == "qlora":
            model = freeze_for_kbit(model)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=lora_target_regex(cfg), bias="none",
        )
        model = get_peft_model(model, lora)
    elif cfg.strategy == "partial":
        lo, hi = layer_range(cfg.partial_layers, count_lm_layers(model))
        log.info("partial: language-model layers %d..%d train", lo, hi)

        def keep(name: str) -> bool:
            m = LM_LAYER.search(name)
            return m is not None and lo <= int(m.group(1)) <= hi

        _freeze_all_but(model, keep)
    elif cfg.strategy == "freeze_llm":
        _freeze_all_but(model, lambda n: bool(MERGER.search(n) or (cfg.train_vision and VISION.search(n))))
    elif cfg.strategy == "full":
        _freeze_all_but(model, lambda n: True)
    if cfg.gradient_checkpointing:
        drop_input_grad_hooks(model)
    upcast_trainable(model)
    counts = count_parameters(model)
    if counts.trainable == 0:
        raise EcomcapError(f"strategy {cfg.strategy!r} left no trainable parameters")
    log.info("strategy %s: %s", cfg.strategy, counts)
    return model, counts
