"""Where a run writes: every path setting of a config, and the check that on a cluster they all
lie on the mounted volume. A relative path in a Kubernetes pod resolves inside the container,
which a retried pod does not get back: the retry would start training over."""
from __future__ import annotations

import os
import typing
from pathlib import Path, PurePosixPath

from pydantic import BaseModel

from ecomcap.errors import EcomcapError


def path_settings(cfg: BaseModel, prefix: str = "") -> dict[str, Path]:
    """Every set path field of `cfg` and its sections, by dotted name ("sft.output_dir")."""
    out: dict[str, Path] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            out.update(path_settings(value, f"{prefix}{name}."))
        elif isinstance(value, Path):
            out[f"{prefix}{name}"] = value
    return out


def off_volume(cfg: BaseModel, mounts: typing.Iterable[str]) -> list[str]:
    """The path settings that are relative or outside every mount ("name: value")."""
    roots = [PurePosixPath(m) for m in mounts]
    bad = []
    for name, value in path_settings(cfg).items():
        p = PurePosixPath(value.as_posix())
        if not p.is_absolute() or not any(p == r or r in p.parents for r in roots):
            bad.append(f"{name}: {value}")
    return bad


def in_kubernetes_pod() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ


def require_durable_paths(cfg: BaseModel) -> None:
    """In a Kubernetes pod, refuse relative output paths (they vanish with the pod)."""
    if not in_kubernetes_pod():
        return
    rel = [f"{n}: {v}" for n, v in path_settings(cfg).items() if not v.is_absolute()]
    if rel:
        raise EcomcapError("in a Kubernetes pod every path must be absolute and on the mounted volume "
                           f"(a retried pod would start over): {', '.join(rel)}")
