"""Run identity: what a training run is, so a rerun resumes only its own checkpoints.

A run is its stage configs (minus settings that do not change the trajectory, such as where it
writes or how often it saves), the training data's fingerprint and the base model's
fingerprint. Each identity trains in its own folder `output_dir/run-<id>`; a rerun with another
learning rate, data or strategy starts fresh next to the old one instead of resuming it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# loop settings that do not change what is trained (where, how often saved, how resumed)
NOT_IDENTITY = {"output_dir", "resume", "stop_after_steps", "save_every", "keep_checkpoints", "dist_timeout_min"}
LATEST = "latest.json"  # output_dir/latest.json: the last finished run of this output_dir


def _strip(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in NOT_IDENTITY}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def model_fingerprint(name_or_path: str | Path) -> str:
    """Cheap identity of a base model: a hub id as it is; a directory by its configs and the
    names, sizes and head/tail bytes of its weight files (no full read of a 15 GB checkpoint)."""
    root = Path(name_or_path)
    if not root.is_dir():
        return f"hub:{name_or_path}"
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".json" and p.name not in ("ecomcap_model.json", "training_config.json"):
            h.update(rel.encode() + p.read_bytes())
        elif p.suffix in (".safetensors", ".bin"):
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
            h.update(f"{rel}\t{size}".encode() + head + tail)
    return h.hexdigest()[:16]


def run_identity(configs: dict, data_fingerprint: str, base_fingerprint: str) -> str:
    blob = json.dumps({"configs": _strip(configs), "data": data_fingerprint, "base": base_fingerprint},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_dir(output_dir: Path, identity: str, stage: str) -> Path:
    """The folder of this identity; says in one line when other runs' checkpoints are left alone."""
    mine = Path(output_dir) / f"run-{identity}"
    others = [p.name for p in Path(output_dir).glob("run-*") if p != mine and (p / "checkpoints").is_dir()
              and any((p / "checkpoints").glob("step-*"))]
    if others and not mine.exists():
        log.warning("%s: %s holds resumable checkpoints of another config/data/base model (%s): not "
                    "resumed; this run starts fresh in %s", stage, output_dir, ", ".join(sorted(others)), mine)
    return mine


def record_finished(output_dir: Path, run: Path, model_dir: Path) -> None:
    (Path(output_dir) / LATEST).write_text(json.dumps(
        {"run": run.name, "model_dir": str(model_dir.relative_to(output_dir))}), encoding="utf-8")


def finished_output(output_dir: str | Path) -> Path | None:
    """The model the last finished run of `output_dir` handed on (best, else final), if any."""
    p = Path(output_dir) / LATEST
    if not p.is_file():
        return None
    found = Path(output_dir) / json.loads(p.read_text(encoding="utf-8"))["model_dir"]
    return found if found.is_dir() else None
