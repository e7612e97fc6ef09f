"""The registered model: a merged, self-contained model directory wrapped as an MLflow pyfunc.

`predict` takes base64 images (a DataFrame column "image", optional "image_id", or a list of
strings) and returns captions, so `mlflow models serve -m models:/<name>@champion` serves it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow.pyfunc

from ecomcap.config import GenerateConfig, ModelConfig

INFERENCE_FILE = "inference.json"


def export_merged(model_dir: str | Path, out_dir: str | Path, model_cfg: ModelConfig,
                  gen_cfg: GenerateConfig) -> Path:
    """Merge adapters into their base and write one standalone model directory."""
    from ecomcap.modeling.load import load_trained, write_output_marker
    from ecomcap.modeling.processor import save_processor

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, processor = load_trained(model_dir, model_cfg)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
    write_output_marker(out, kind="full", base=None, extra={"merged_from": str(model_dir)})
    (out / INFERENCE_FILE).write_text(json.dumps(
        inference_settings(model_cfg, gen_cfg), ensure_ascii=False, indent=2),
        encoding="utf-8")
    return out


def inference_settings(model_cfg: ModelConfig, gen_cfg: GenerateConfig) -> dict:
    """What changes a caption besides the weights: prompt, decoding, image resolution bounds."""
    return {"prompt": model_cfg.prompt, "generate": gen_cfg.model_dump(mode="json"),
            "min_pixels": model_cfg.min_pixels, "max_pixels": model_cfg.max_pixels}


class CaptionModel(mlflow.pyfunc.PythonModel):
    """pyfunc: base64 images in, Chinese product captions out."""

    def load_context(self, context) -> None:
        from ecomcap.modeling.load import load_trained
        from ecomcap.training.collate import PromptBuilder

        path = Path(context.artifacts["model_dir"])
        info = json.loads((path / INFERENCE_FILE).read_text(encoding="utf-8"))
        self.gen = GenerateConfig.model_validate(info["generate"])
        self.model, processor = load_trained(path, ModelConfig(name_or_path=str(path)))
        self.builder = PromptBuilder(processor, info["prompt"])

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers no schema from hints
        import io

        import pandas as pd
        from PIL import Image

        from ecomcap.data.formats import decode_base64
        from ecomcap.inference.generate import caption_images

        if isinstance(model_input, pd.DataFrame):
            b64 = model_input["image"].tolist()
            ids = model_input["image_id"].tolist() if "image_id" in model_input else list(range(len(b64)))
        else:
            b64, ids = list(model_input), list(range(len(model_input)))
        images = [Image.open(io.BytesIO(decode_base64(s))).convert("RGB") for s in b64]
        captions = caption_images(self.model, self.builder, images, self.gen, progress=False)
        return pd.DataFrame({"image_id": ids, "caption": captions})


def log_pyfunc(merged_dir: str | Path, name: str = "model"):
    """Log the merged directory as a pyfunc model of the active run; returns ModelInfo."""
    import ecomcap

    package = Path(ecomcap.__file__).parent
    return mlflow.pyfunc.log_model(  # models-from-code: nothing is pickled
        name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"model_dir": str(merged_dir)},
        code_paths=[str(package)],
        pip_requirements=["torch", "transformers>=5,<6", "peft", "pillow", "pandas", "pydantic>=2",
                          "pyarrow", "numpy", "safetensors", "tqdm"],
    )
