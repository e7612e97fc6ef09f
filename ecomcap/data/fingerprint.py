"""The one identity of a job's raw input, shared by the captioning and retrieval jobs: the
pipelines pass it to their ingest step as a cache key (ZenML reruns ingest when files change) and
versions are tagged with it (`retrain --if-changed`). Imports no settings, so any layer can use it."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)


class DataSource(Protocol):
    """What both jobs' data settings share (`DataConfig`, `RetrievalDataConfig`)."""

    source: str
    src_dir: Path | None
    manifest: Path | None
    synth: Any
    ingest: Any


def source_fingerprint(data: DataSource) -> str:
    """Cheap identity of the raw input: the synthetic settings, a committed manifest standing for
    remote data, or the files' names, sizes and mtimes; plus the ingest settings."""
    h = hashlib.sha256()
    if data.source == "synthetic":
        h.update(json.dumps(data.synth.model_dump(mode="json"), sort_keys=True).encode())
    elif data.manifest is not None:  # remote data: a committed manifest stands for its content
        if not Path(data.manifest).is_file():
            raise EcomcapError(f"data.manifest {data.manifest} does not exist: commit it or unset data.manifest")
        h.update(Path(data.manifest).read_bytes())
    elif data.src_dir is not None and Path(data.src_dir).exists():
        for p in sorted(Path(data.src_dir).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(data.src_dir)}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
    else:
        log.warning("data.src_dir %s is not visible here and no data.manifest is set: the cache key "
                    "and retrain check cannot see data changes", data.src_dir)
        h.update(f"unseen:{data.src_dir}".encode())
    h.update(json.dumps(data.ingest.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()[:16]
