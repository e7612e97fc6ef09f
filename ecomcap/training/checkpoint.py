"""Training checkpoints (resume) and exported model directories (hand-off to the next stage).

A checkpoint holds only what changes: the trainable parameters (safetensors), optimizer,
scheduler and RNG states, and the step counter. An export is a loadable model directory:
a LoRA adapter over its named base, or full weights, plus the processor and the configs used.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ecomcap.errors import EcomcapError
from ecomcap.modeling.load import write_output_marker
from ecomcap.modeling.processor import save_processor

STATE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".rng-step-{step:07d}"


def save_rng(ckpt_root: Path, step: int, rank: int) -> None:
    """Each rank writes its own generator states (ranks sample differently), before the main
    process writes the checkpoint that collects them."""
    import numpy as np

    d = _rng_dir(ckpt_root, step)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(), "numpy": _numpy_state(np.random.get_state())},
               d / f"rng-rank{rank}.pt")


def _numpy_state(state: tuple) -> tuple:
    """numpy's MT19937 state with its key array as a tensor (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached


def _restore_rng(path: Path, rank: int, legacy: dict) -> None:
    import numpy as np

    own = path / f"rng-rank{rank}.pt"
    if not own.is_file():
        if any(path.glob("rng-rank*.pt")):
            raise EcomcapError(f"{path} holds other ranks' generator states but not rank {rank}'s: resume with the "
                               "processes (nodes x num_processes) that wrote it")
        torch.set_rng_state(legacy["rng"])  # written before per-rank states: rank 0's torch state only
        return
    blob = torch.load(own, map_location="cpu", weights_only=True)
    torch.set_rng_state(blob["torch"])
    if blob["cuda"] and torch.cuda.is_available():  # SCST samples on the GPU generator
        torch.cuda.set_rng_state_all(blob["cuda"])
    random.setstate(blob["python"])
    name, keys, pos, has_gauss, cached = blob["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def collect_rng(ckpt_root: Path, step: int, dest: Path, world: int | None, wait_s: float = 90.0) -> None:
    """Move every rank's generator states into the checkpoint being written. On a shared (NFS)
    volume another pod's files can show in a listing late (attribute caches hold directories up to
    60 s): wait for every rank's own file, as a checkpoint without a rank's states would resume
    that rank on rank 0's generators. `world` None: whatever is there."""
    rng = _rng_dir(ckpt_root, step)
    wanted = {f"rng-rank{r}.pt" for r in range(world or 0)}
    deadline = time.monotonic() + wait_s
    while not wanted <= {f.name for f in rng.glob("rng-rank*.pt")} and time.monotonic() < deadline:
        time.sleep(0.5)
    missing = sorted(wanted - {f.name for f in rng.glob("rng-rank*.pt")})
    if missing:
        raise EcomcapError(f"checkpoint of step {step}: {', '.join(missing)} missing in {rng} after {wait_s:.0f} s "
                           "(is the output directory on a volume every pod shares?)")
    for f in rng.glob("rng-rank*.pt"):
        shutil.move(str(f), dest / f.name)
    shutil.rmtree(rng, ignore_errors=True)


def complete_rng(path: Path, world: int) -> bool:
    """Whether a checkpoint holds every rank's generator states (or none: written before per-rank
    states, resumed from rank 0's)."""
    have = {f.name for f in Path(path).glob("rng-rank*.pt")}
    return not have or {f"rng-rank{r}.pt" for r in range(world)} <= have


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                    world: int | None = None) -> Path:
    """Write ``step-NNNNNNN/`` atomically (tmp dir + rename) and prune old ones."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "rng": torch.get_rng_state()},
        tmp / "optim.pt",
    )
    collect_rng(ckpt_root, step, tmp, world)
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in sorted(ckpt_root.glob("step-*")) if (p / STATE).is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    """Restore a checkpoint in place (this rank's own RNG states); returns its trainer state."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _restore_rng(path, rank, blob)
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def _save_weights(model, out: Path, is_adapter: bool, weights: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained in the dtype the weights were loaded in: trainables train in fp32 (see
    `upcast_trainable`), but a full 7B export in fp32 would be ~30 GB with config.json saying
    float32. fp32 stays only in checkpoints (trainable.safetensors), for exact resume.
    `weights`: the state dict to write instead of the module's own (ZeRO-3's gathered weights:
    the module itself then holds empty shards)."""
    import contextlib

    from ecomcap.modeling.partitions import default_key_conversions
    from ecomcap.modeling.strategies import load_dtype

    target = None if is_adapter else load_dtype(model)
    keys = default_key_conversions(model) if weights is not None and not is_adapter else contextlib.nullcontext()
    if target is None:
        with keys:
            model.save_pretrained(out, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        return
    cast: dict[int, torch.Tensor] = {}  # by storage: tied weights stay one tensor
    state = {}
    for name, t in (weights if weights is not None else model.state_dict()).items():
        if t.dtype == torch.float32:
            key = t.data_ptr()
            if key not in cast:
                cast[key] = t.detach().to(device="cpu", dtype=target)
            t = cast[key]
        state[name] = t
    with keys:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(target).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    model.config.dtype = config["dtype"]


def export_model(model, processor, out_dir: Path, *, base: str, strategy: str, configs: dict,
                 metrics_log: Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                 marker: dict | None = None) -> Path:
    """A loadable directory: adapter (LoRA/QLoRA) or full weights, processor, configs used
    (`state_dict`: gathered weights to write, see `_save_weights`; `marker`: more fields for the
    output marker, e.g. the decoding length the data asked for)."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    is_adapter = hasattr(model, "peft_config")
    _save_weights(model, tmp, is_adapter, state_dict)
    save_processor(processor, tmp)
    from ecomcap.modeling.strategies import is_4bit

    # quantized_base: the base this adapter trained over was 4-bit (QLoRA, or LoRA over a merged
    # QLoRA model); evaluation and export must load it the same way
    write_output_marker(tmp, kind="adapter" if is_adapter else "full", base=base if is_adapter else None,
                        extra={"strategy": strategy, "quantized_base": is_4bit(model), **(marker or {})})
    (tmp / "training_config.json").write_text(
        json.dumps(configs, ensure_ascii=False, indent=2, default=str), encoding="utf-8"
    )
    if metrics_log is not None and metrics_log.is_file():  # the curves travel with the model
        shutil.copy(metrics_log, tmp / "metrics.jsonl")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
