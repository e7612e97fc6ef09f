"""Shared test helpers: tiny hand-built MUGE sources (independent of the synthetic generator)."""
import io
import os

import pytest
from PIL import Image

os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def make_image(color="red", size=(64, 48), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bomb_png() -> bytes:
    """A real PNG declaring 12000x12000 pixels (tiny compressed): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000), 0).save(buf, "PNG")
    return buf.getvalue()


TINY_TEST_MODEL = dict(text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1,
                       text_intermediate=128, vision_depth=2, vision_hidden=32, vision_heads=2)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small synthetic set, ingested: {"root", "train", "valid", "test"} paths."""
    from ecomcap.config import DataConfig, SynthConfig
    from ecomcap.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("small_data")
    cfg = DataConfig(work_dir=root, splits=["train", "valid", "test"],
                     synth=SynthConfig(train=48, valid=8, test=6, seed=5))
    prepare_data(cfg)
    return {"root": root, "train": root / "train", "valid": root / "valid", "test": root / "test",
            "raw": root / "raw"}


@pytest.fixture(scope="session")
def tiny_model_cfg(small_data, tmp_path_factory):
    """A ModelConfig for a very small tiny model, built once per session."""
    import torch

    from ecomcap.config import ModelConfig, TinyModelConfig
    from ecomcap.modeling.prepare import ensure_model

    torch.set_num_threads(2)
    cfg = ModelConfig(name_or_path=str(tmp_path_factory.mktemp("tiny") / "model"),
                      tiny=TinyModelConfig(**TINY_TEST_MODEL))
    ensure_model(cfg, small_data["train"])
    return cfg


@pytest.fixture(scope="session")
def merged(tiny_model_cfg, tmp_path_factory):
    """The tiny model as a standalone registered-style directory (weights + inference.json)."""
    from ecomcap.config import GenerateConfig
    from ecomcap.registry.pyfunc import export_merged

    out = tmp_path_factory.mktemp("merged")
    return export_merged(tiny_model_cfg.name_or_path, out / "model_dir", tiny_model_cfg,
                         GenerateConfig(num_beams=1, max_new_tokens=6))
