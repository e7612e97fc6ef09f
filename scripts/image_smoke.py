"""Build-time smoke test of the GPU image, on the build machine's CPU in seconds: the modules the
steps import, then one tiny Qwen2.5-VL (the real class) loaded through `load_base`, prefilled and
decoded with the shipped decoding settings (beam search with the repetition penalty and n-gram
blocking, and greedy), the fast path's ids equal to stock `generate`'s.

    python scripts/image_smoke.py [--imports zenml,mlflow,...]   # docker/Dockerfile runs it
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

DEFAULT_IMPORTS = "zenml,mlflow,transformers,peft,accelerate,safetensors,ecomcap.config,ecomcap.workflow"


def smoke(workdir: Path) -> list[str]:
    import numpy as np
    import torch
    from PIL import Image

    from ecomcap.config import GenerateConfig, ModelConfig, TinyModelConfig
    from ecomcap.inference.generate import caption_images
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.tiny import ensure_tiny_model
    from ecomcap.training.collate import PromptBuilder

    cfg = ModelConfig(name_or_path=str(workdir / "tiny"), tiny=TinyModelConfig(), device="cpu", dtype="float32")
    ensure_tiny_model(cfg.name_or_path, [cfg.prompt, "红色条纹T恤", "蓝色纯色连衣裙"], cfg.tiny)
    torch.manual_seed(0)
    model, processor = load_base(cfg)
    with torch.no_grad():
        for p in model.parameters():  # random init decodes near-uniform text; perturbed, rows differ
            p.add_(torch.randn_like(p) * 0.2)
    builder = PromptBuilder(processor, cfg.prompt)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    shipped = GenerateConfig(num_beams=3, repetition_penalty=1.2, no_repeat_ngram_size=3, max_new_tokens=8)
    out = []
    for gen in (shipped, shipped.model_copy(update={"num_beams": 1})):
        fast = caption_images(model, builder, images, gen, progress=False)
        stock = caption_images(model, builder, images, gen.model_copy(update={"prefill": "hf"}), progress=False)
        if fast != stock:
            raise SystemExit(f"image smoke: fast path {fast} != stock generate {stock} (num_beams={gen.num_beams})")
        out += fast
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imports", default=DEFAULT_IMPORTS, help="comma-separated modules that must import")
    args = ap.parse_args(argv)
    for name in filter(None, args.imports.split(",")):
        importlib.import_module(name)
    with tempfile.TemporaryDirectory(prefix="ecomcap-smoke-") as tmp:
        captions = smoke(Path(tmp))
    print(f"image smoke OK: {len(captions)} captions, fast path == stock generate", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
