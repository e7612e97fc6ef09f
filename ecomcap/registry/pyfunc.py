"""The registered model: a merged, self-contained model directory wrapped as an MLflow pyfunc.

`predict` takes base64 images (a DataFrame column "image", optional "image_id", or a list of
strings) and returns captions, so `mlflow models serve -m models:/<name>@champion` serves it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow.pyfunc

from ecomcap.config import GenerateConfig, ModelConfig, RunConfig
from ecomcap.inference.prompt import INFERENCE_FILE, with_model_prompt
from ecomcap.inference.rerank import SCORER_DIR, resolve_scorer, scorer_path

log = logging.getLogger(__name__)


def export_merged(model_dir: str | Path, out_dir: str | Path, model_cfg: ModelConfig,
                  gen_cfg: GenerateConfig) -> Path:
    """Merge adapters into their base and write one standalone model directory."""
    from ecomcap.inference.generate import with_decode_length
    from ecomcap.modeling.load import load_trained, write_output_marker
    from ecomcap.modeling.processor import save_processor

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, processor = load_trained(model_dir, model_cfg)
    gen_cfg = with_decode_length(gen_cfg, model)  # served with the decoding length it was evaluated with
    data_length = getattr(model, "ecomcap_decode_length", None)  # (before merging: a new object)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
    write_output_marker(out, kind="full", base=None,
                        extra={"merged_from": str(model_dir),
                               "max_new_tokens": data_length})  # the data's, as the source recorded it
    from ecomcap.modeling.strategies import is_4bit

    settings = inference_settings(with_model_prompt(model_dir, model_cfg), gen_cfg)  # the prompt it learnt
    if is_4bit(model):  # merged from QLoRA: a 4-bit bitsandbytes checkpoint loads (serves) on CUDA only
        settings["quantization"] = {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4",
                                    "merged_from_4bit": True, "requires": "cuda"}
    scorer = gen_cfg.rerank.scorer_dir if gen_cfg.rerank.candidates else None
    if scorer:  # the reranker's scorer travels with the model (served = what was evaluated)
        shutil.copytree(scorer_path(resolve_scorer(scorer, model_dir)), out / SCORER_DIR)
        settings["generate"]["rerank"]["scorer_dir"] = SCORER_DIR
    (out / INFERENCE_FILE).write_text(json.dumps(settings, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def generate_settings(info: dict, model_dir: Path, **update) -> GenerateConfig:
    """The decoding settings an exported model records, its reranker's scorer resolved."""
    from ecomcap.inference.rerank import with_scorer

    return with_scorer(GenerateConfig.model_validate({**info["generate"], **update}), model_dir)


def recorded_model_config(info: dict, base: ModelConfig) -> ModelConfig:
    """`base` with what an exported model records about its inputs: prompt, dtype, pixel bounds."""
    return base.model_copy(update={"prompt": info["prompt"], "dtype": info.get("dtype", "auto"),
                                   "min_pixels": info.get("min_pixels"), "max_pixels": info.get("max_pixels")})


def as_recorded(cfg: RunConfig, model_dir: str | Path, device: str | None = None, warn: bool = True) -> RunConfig:
    """`cfg` as a registered model is captioned everywhere - the gate's re-evaluation, batch
    inference, serving: its recorded prompt, decoding, pixel bounds and dtype (the version is those
    settings as much as its weights). Batch size, chunking and `device` (None: the config's) are the
    caller's: speed and place, not captions. `warn`: say so when the config asks for other settings."""
    info = json.loads((Path(model_dir) / INFERENCE_FILE).read_text(encoding="utf-8"))
    gen = generate_settings(info, Path(model_dir), batch_size=cfg.generate.batch_size,
                            chunks=cfg.generate.chunks.model_dump())
    model = recorded_model_config(info, cfg.model).model_copy(update={"device": device or cfg.model.device})
    ignore = {"batch_size": True, "chunks": True, "rerank": {"scorer_dir"},
              # unset in the config: the model's own length from its data is what the config asks for
              **({"max_new_tokens": True} if cfg.generate.max_new_tokens is None else {})}
    inputs = ("min_pixels", "max_pixels", "dtype")
    if warn and (gen.model_dump(mode="json", exclude=ignore) != cfg.generate.model_dump(mode="json", exclude=ignore)
                 or any(getattr(model, k) != getattr(cfg.model, k) for k in inputs)):
        log.warning("%s records its own decoding and image settings (%s): captioning with those, not the config's "
                    "generate / model pixel bounds (served and gated captions are made with them)", model_dir,
                    INFERENCE_FILE)
    return cfg.model_copy(update={"model": model, "generate": gen})


def inference_settings(model_cfg: ModelConfig, gen_cfg: GenerateConfig) -> dict:
    """What changes a caption besides the weights: prompt, decoding, image resolution bounds, the
    dtype it runs in (not the batch size: that changes speed, not captions)."""
    return {"prompt": model_cfg.prompt, "generate": gen_cfg.model_dump(mode="json", exclude={"batch_size"}),
            "min_pixels": model_cfg.min_pixels, "max_pixels": model_cfg.max_pixels, "dtype": model_cfg.dtype}


class CaptionModel(mlflow.pyfunc.PythonModel):
    """pyfunc: base64 images in, Chinese product captions out."""

    def load_context(self, context) -> None:
        from ecomcap.modeling.load import load_trained
        from ecomcap.training.collate import PromptBuilder

        path = Path(context.artifacts["model_dir"])
        info = json.loads((path / INFERENCE_FILE).read_text(encoding="utf-8"))
        self.gen = generate_settings(info, path)  # a reranker without its shipped scorer: refused here
        # the recorded pixel bounds and dtype, as batch inference and the gate use them
        self.model, processor = load_trained(path, recorded_model_config(info, ModelConfig(name_or_path=str(path))))
        self.builder = PromptBuilder(processor, info["prompt"])

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers no schema from hints
        """One row out per row in; a row whose image cannot be used gets an `error` (else "") and
        an empty caption, the others are captioned. Never raises for bad rows (MLflow would answer the
        whole batch with HTTP 400 and a stack trace)."""
        import pandas as pd

        from ecomcap.inference.generate import caption_images

        rows = request_rows(model_input)
        ok = [r for r in rows if r["image"] is not None]
        try:
            captions = caption_images(self.model, self.builder, [r["image"] for r in ok], self.gen,
                                      progress=False) if ok else []
        except Exception:  # one image the checks let through must not cost the batch: one by one
            captions = [self._one(r) for r in ok]
        for r, c in zip(ok, captions):
            r["caption"] = c
        return pd.DataFrame({"image_id": [r["image_id"] for r in rows],
                             "caption": [r.get("caption") or "" for r in rows],
                             "error": [r["error"] or "" for r in rows]})

    def _one(self, row: dict) -> str:
        from ecomcap.inference.generate import caption_images

        try:
            return caption_images(self.model, self.builder, [row["image"]], self.gen, progress=False)[0]
        except Exception as exc:  # reported in the row, never as a stack trace
            row["error"] = f"captioning failed: {type(exc).__name__}"
            return ""


def request_rows(model_input) -> list[dict]:
    """Decode a request: [{"image_id", "image": PIL image or None, "error": None or reason}].

    Accepts a DataFrame with an "image" column (optional "image_id") or a list of base64
    strings; a request without images at all raises an MlflowException with a one-line message."""
    import io

    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from PIL import Image

    from ecomcap.config import IngestConfig
    from ecomcap.data.formats import decode_base64
    from ecomcap.data.images import check_image
    from ecomcap.text import printable

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input:
            raise MlflowException("the request needs an 'image' column of base64 images",
                                  error_code=INVALID_PARAMETER_VALUE)
        b64 = model_input["image"].tolist()
        ids = model_input["image_id"].tolist() if "image_id" in model_input else list(range(len(b64)))
    else:
        b64 = list(model_input)
        ids = list(range(len(b64)))
    rows = []
    for image_id, value in zip(ids, b64):
        row = {"image_id": printable(image_id) if isinstance(image_id, str) else image_id, "image": None,
               "error": None}
        try:
            if not isinstance(value, str):
                raise ValueError(f"image must be a base64 string, got {type(value).__name__}")
            data = decode_base64(value)
            check = check_image(data, min_side=1, max_pixels=IngestConfig().max_pixels)
            if not check.ok:
                raise ValueError(f"{check.reason}: {check.detail}")
            row["image"] = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:  # PIL raises many types for undecodable bytes
            row["error"] = f"unusable image: {printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}"
        rows.append(row)
    return rows


def log_code_model(entry: str | Path, artifacts: dict[str, str], requirements: list[str], name: str = "model"):
    """Log a models-from-code pyfunc (`entry` calls mlflow.models.set_model) with the ecomcap
    package as code: nothing is pickled. Both jobs package their models through this; returns ModelInfo."""
    import ecomcap

    return mlflow.pyfunc.log_model(name=name, python_model=str(entry), artifacts=artifacts,
                                   code_paths=[str(Path(ecomcap.__file__).parent)], pip_requirements=requirements)


def log_pyfunc(merged_dir: str | Path, name: str = "model"):
    """Log the merged directory as a pyfunc model of the active run; returns ModelInfo."""
    return log_code_model(Path(__file__).with_name("pyfunc_entry.py"), {"model_dir": str(merged_dir)},
                          ["torch", "transformers>=5,<6", "peft", "pillow", "pandas", "pydantic>=2",
                           "pyarrow", "numpy", "safetensors", "tqdm"], name)
