"""Load processor + model from a hub id or a local directory, and load our trained outputs.

One path for the real Qwen2.5-VL and the local tiny model. Sensible defaults: bf16 + SDPA (or
FlashAttention-2 when installed) on GPU, fp32 on CPU; `trust_remote_code` stays off unless the
config turns it on. A trained output directory (`ecomcap_model.json`) holds either a LoRA
adapter over a named base, or full weights; both come back as a ready model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText

from ecomcap.config import ModelConfig
from ecomcap.errors import EcomcapError
from ecomcap.modeling.patch_embed import install_matmul_patch_embed
from ecomcap.modeling.processor import load_processor

log = logging.getLogger(__name__)
OUTPUT_MARKER = "ecomcap_model.json"


def local_rank() -> int:
    """This process's GPU under torchrun / `accelerate launch` (LOCAL_RANK), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(cfg: ModelConfig) -> torch.device:
    """CPU, or this rank's own GPU: N ranks loading before the Accelerator exists must not all
    land on GPU 0 (N copies of the model there, none on the others)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EcomcapError("model.device is 'cuda' but no CUDA device is available")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    rank, count = local_rank(), torch.cuda.device_count()
    if rank >= count:
        raise EcomcapError(f"LOCAL_RANK {rank} but only {count} GPU(s) are visible: launch.num_processes "
                           "must not exceed the GPUs of the machine (or pod)")
    return torch.device("cuda", rank)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_attention(cfg: ModelConfig, dtype: torch.dtype, packed: bool = False) -> str | dict[str, str]:
    """`auto`: flash-attention varlen for the vision tower where it is installed (one call per
    image instead of one per window: ~1,000 small launches per image per forward), sdpa for the
    text decoder (left-padded batches, and the path every test runs) unless the batches are
    `packed` (varlen then keeps each example's attention to itself; sdpa would need a dense
    block-diagonal mask over the whole packed row); sdpa everywhere otherwise."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    has_fa2 = importlib.util.find_spec("flash_attn") is not None
    if has_fa2 and dtype in (torch.bfloat16, torch.float16):
        text = "flash_attention_2" if packed else "sdpa"
        return {"vision_config": "flash_attention_2", "text_config": text, "": text}
    return "sdpa"


def _check_source(name_or_path: str) -> None:
    """A local path must be a complete model directory; say what is missing."""
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise EcomcapError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise EcomcapError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise EcomcapError(f"{path} has no weights (*.safetensors)")


def expected_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype `load_base` will load `cfg`'s weights in (the Accelerator is made before the load)."""
    return pick_dtype(cfg, pick_device(cfg))


def sharded_load() -> bool:
    """Whether `from_pretrained` now loads into DeepSpeed ZeRO-3 partitions (`zero.Init`: a ZeRO-3
    Accelerator with zero3_init_flag exists); DeepSpeed then places the shards itself."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def load_base(cfg: ModelConfig, quantization_config: Any = None, packed: bool = False):
    """(model, processor) for `cfg.name_or_path`, on the chosen device (or, under ZeRO-3 with
    zero3_init_flag, in this rank's partitions), in eval mode. `packed`: training runs padding-free
    batches (the attention choice follows)."""
    _check_source(cfg.name_or_path)
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # libraries that use "the" current GPU (bitsandbytes) agree
    dtype = pick_dtype(cfg, device)
    sharded = sharded_load()
    if quantization_config is not None and sharded:  # e.g. a DeepSpeed JSON config the launch check cannot read
        raise EcomcapError(f"'{cfg.name_or_path}': a 4-bit (QLoRA) base cannot load into DeepSpeed ZeRO-3 "
                           "partitions; train it with ZeRO-2 or DDP (no launch.config_file)")
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        attn_implementation=pick_attention(cfg, dtype, packed),
        trust_remote_code=cfg.trust_remote_code,
    )
    if quantization_config is not None and not sharded:  # 4-bit weights are placed at load time
        kwargs.update(quantization_config=quantization_config)
    if not sharded and (quantization_config is not None or device.type == "cuda"):
        # straight onto this rank's GPU: 8 ranks of a node do not each build the whole model in host memory first
        kwargs.update(device_map={"": device.index if device.type == "cuda" else "cpu"})
    try:
        processor = load_processor(
            cfg.name_or_path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
            trust_remote_code=cfg.trust_remote_code,
        )
        model = AutoModelForImageTextToText.from_pretrained(cfg.name_or_path, **kwargs)
    except EcomcapError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise EcomcapError(f"cannot load model '{cfg.name_or_path}': {str(exc).splitlines()[0]}") from None
    if "device_map" not in kwargs and not sharded:  # (CPU)
        model.to(device)
    if quantization_config is not None:
        from ecomcap.modeling.strategies import check_vision_16bit

        check_vision_16bit(model)
    if cfg.patch_embed == "matmul" and not install_matmul_patch_embed(model) and not sharded:
        log.info("patch embedding kept as the model's own layer (not a stride=kernel Conv3d, or hooked)")
    model.eval()
    return model, processor


def _qlora_config():
    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.strategies import quantization_config

    return quantization_config(FinetuneConfig(strategy="qlora"))


def write_output_marker(out_dir: Path, *, kind: str, base: str | None, extra: dict) -> None:
    """Describe a trained output directory so `load_trained` knows how to rebuild it."""
    data = {"kind": kind, "base": base, **extra}
    (out_dir / OUTPUT_MARKER).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def read_output_marker(path: str | Path) -> dict | None:
    marker = Path(path) / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        raise EcomcapError(f"{marker} is corrupt (not JSON)") from None


def load_trained(path: str | Path, cfg: ModelConfig | None = None, quantized: bool = False):
    """(model, processor) of a trained output (adapter over its base, or full weights).

    A plain model directory or hub id without our marker loads as a base model (4-bit when
    `quantized`); an adapter's base may be another trained output (SCST's LoRA over the SFT
    model), merged first, exactly as the SCST stage merged it before training.
    """
    cfg = cfg or ModelConfig()
    path = Path(path)
    info = read_output_marker(path) if path.is_dir() else None
    if info is None:
        return load_base(cfg.model_copy(update={"name_or_path": str(path)}), _qlora_config() if quantized else None)
    model, processor = _load_output(path, info, cfg, quantized)
    model.ecomcap_decode_length = info.get("max_new_tokens")  # what its training data asked for (generate)
    return model, processor


def _load_output(path: Path, info: dict, cfg: ModelConfig, quantized: bool):
    if info["kind"] == "full":  # 4-bit when a QLoRA stage trains over it (SCST after full SFT)
        return load_base(cfg.model_copy(update={"name_or_path": str(path)}), _qlora_config() if quantized else None)
    if info["kind"] != "adapter":
        raise EcomcapError(f"{path}: unknown output kind {info['kind']!r}")
    from peft import PeftModel

    if not (path / "adapter_config.json").is_file():
        raise EcomcapError(f"{path} says it holds an adapter but has no adapter_config.json")
    # the base as training saw it: 4-bit when the adapter trained over a 4-bit base (an adapter
    # evaluated over an unquantised base is not the model that was trained); markers written
    # before `quantized_base` existed say it by their strategy
    was_4bit = info.get("quantized_base", info.get("strategy") == "qlora")
    model, _ = load_trained(info["base"], cfg, quantized=quantized or bool(was_4bit))
    if hasattr(model, "merge_and_unload"):  # an adapter under this one: merged, as in training
        if getattr(model, "is_loaded_in_4bit", False):
            log.warning("merging the adapter under %s into the 4-bit base (requantised, as SCST did)", path)
        from ecomcap.modeling.partitions import merge_adapter

        model = merge_adapter(model)  # gathers ZeRO-3 partitions when there are any
    processor = load_processor(path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    try:
        model = PeftModel.from_pretrained(model, path, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise EcomcapError(f"cannot load adapter from {path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, processor
