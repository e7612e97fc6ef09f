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


MIXED_SIZES = [(84, 140), (140, 84), (112, 112), (168, 56), (56, 168), (196, 112)]


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """A checkpoint in the hub's Qwen2.5-VL layout (real tokenizer, tiny width), built once."""
    import torch

    from ecomcap.modeling.hubfixture import TEST_ARCH, build_hub_checkpoint

    torch.set_num_threads(2)
    return build_hub_checkpoint(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-tiny-Instruct", TEST_ARCH)


@pytest.fixture(scope="session")
def hub_model_cfg(hub_checkpoint):
    """Loads the hub-layout directory exactly as a hub id would be (no `tiny` section)."""
    from ecomcap.config import ModelConfig

    return ModelConfig(name_or_path=str(hub_checkpoint), prompt="请描述这件商品。")


@pytest.fixture(scope="session")
def mixed_data(small_data, tmp_path_factory):
    """`small_data`'s train/valid images re-encoded at mixed aspect ratios and sizes (real photos
    are not square), ingested: image-token counts differ inside a batch."""
    import shutil

    from ecomcap.config import DataConfig
    from ecomcap.data.formats import decode_base64, write_image_tsv
    from ecomcap.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("mixed_data")
    raw = root / "raw"
    raw.mkdir()
    for split in ("train", "valid"):
        shutil.copy(small_data["raw"] / f"IC_{split}.jsonl", raw / f"IC_{split}.jsonl")
        rows = []
        for i, line in enumerate((small_data["raw"] / f"IC_{split}.tsv").read_text().splitlines()):
            image_id, b64 = line.split("\t")
            im = Image.open(io.BytesIO(decode_base64(b64))).convert("RGB")
            buf = io.BytesIO()
            im.resize(MIXED_SIZES[i % len(MIXED_SIZES)]).save(buf, "JPEG")
            rows.append((image_id, buf.getvalue()))
        write_image_tsv(raw / f"IC_{split}.tsv", rows)
    prepare_data(DataConfig(source="dir", src_dir=raw, work_dir=root, splits=["train", "valid"]))
    return {"root": root, "train": root / "train", "valid": root / "valid"}
