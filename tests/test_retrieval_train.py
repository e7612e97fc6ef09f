"""Retrieval training on the shared loop: a short run learns, resume is exact (hard negatives
included), gradient caching and LoRA run through the same path, the export loads."""
import json
from pathlib import Path

import numpy as np
import pytest

from ecomcap.retrieval.config import (
    EncoderConfig,
    HardNegativeConfig,
    RetrievalDataConfig,
    RetrievalRunConfig,
    RetrievalSynthConfig,
    RetrievalTrainConfig,
    TinyEncoderConfig,
)
from ecomcap.retrieval.data.prepare import prepare_retrieval_data
from ecomcap.retrieval.model.encoder import load_encoder
from ecomcap.retrieval.train.loop import train_retriever

TINY = TinyEncoderConfig(hidden=32, layers=1, heads=2, projection_dim=16, image_size=32, patch_size=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdata")
    cfg = RetrievalDataConfig(work_dir=root, synth=RetrievalSynthConfig(train_products=16, valid_products=12,
                                                                       image_size=48, seed=2))
    return prepare_retrieval_data(cfg)


def _cfg(tmp, name, **train):
    base = dict(output_dir=tmp / name, max_steps=4, batch_size=8, lr=2e-3, eval_every=2, save_every=2,
                mixed_precision="no", hard_negatives=HardNegativeConfig(enabled=True, start_step=2, per_query=3))
    return RetrievalRunConfig(
        encoder=EncoderConfig(name_or_path=str(tmp / "tiny"), tiny=TINY, item_embedding="fused", device="cpu"),
        train=RetrievalTrainConfig(**{**base, **train}))


def test_resume_is_exact_with_hard_negatives_and_grad_cache(data, tmp_path):
    full = train_retriever(data["train"], data["valid"], _cfg(tmp_path, "full", grad_cache_chunk=3, match_weight=1.0))
    with pytest.raises(InterruptedError):
        train_retriever(data["train"], data["valid"], _cfg(tmp_path, "cut", grad_cache_chunk=3, match_weight=1.0,
                                                          stop_after_steps=2))
    assert not (tmp_path / "cut" / "hard_negatives.json").exists()  # mined at step 2, after the stop
    resumed = train_retriever(data["train"], data["valid"], _cfg(tmp_path, "cut", grad_cache_chunk=3,
                                                                 match_weight=1.0))
    assert resumed.resumed_from == 2 and resumed.param_digest == full.param_digest
    negs = json.loads((tmp_path / "cut" / "hard_negatives.json").read_text())
    assert negs == json.loads((tmp_path / "full" / "hard_negatives.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "in_batch_acc", "match_loss"} <= set(rows[0]) and any("val_MeanRecall" in r for r in rows)
    enc = load_encoder(full.model_dir, device="cpu")
    assert enc.item_embedding == "fused" and enc.encode_texts(["红色 T恤"]).shape == (1, 16)


def test_lora_sigmoid_run_exports_merged_weights(data, tmp_path):
    cfg = _cfg(tmp_path, "lora", strategy="lora", loss="sigmoid", max_steps=2, eval_every=0, save_every=0,
               lora_targets=["query", "value", "q_proj", "v_proj"],
               hard_negatives=HardNegativeConfig(enabled=False))
    res = train_retriever(data["train"], data["valid"], cfg)
    assert res.params.trainable < res.params.total / 2
    out = Path(res.model_dir)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    enc = load_encoder(out, device="cpu")
    assert type(enc.dual.model).__name__ == "ChineseCLIPModel"
    t, b = enc.dual.scale_bias()  # the sigmoid loss on a from-scratch model starts at SigLIP's init
    assert abs(float(t) - np.log(10)) < 0.1 and abs(float(b) + 10) < 0.1
    # ... and LoRA trains the logit scale and bias too (they are not adapter weights)
    assert abs(float(t) - np.log(10)) > 1e-5 and abs(float(b) + 10) > 1e-5


def test_lora_leaves_logit_scale_and_bias_trainable(tmp_path):
    from ecomcap.retrieval.train.loop import apply_strategy, prepare_encoder

    for arch in ("chinese_clip", "siglip"):
        cfg = RetrievalRunConfig(
            encoder=EncoderConfig(name_or_path=str(tmp_path / arch), arch=arch, tiny=TINY, device="cpu"),
            train=RetrievalTrainConfig(output_dir=tmp_path / "o", strategy="lora", loss="sigmoid",
                                       lora_targets=["query", "value", "q_proj", "v_proj"]))
        dual, _, scratch = prepare_encoder(cfg, ["红色 T恤", "蓝色 连衣裙"])
        dual = apply_strategy(dual, cfg, scratch)
        assert all(p.requires_grad for p in dual.logit_parameters()), arch


def test_a_short_run_beats_its_random_init(data, tmp_path):
    from ecomcap.retrieval.evaluate.embed import embed_split, recall_of

    cfg = _cfg(tmp_path, "learn", max_steps=40, eval_every=0, save_every=0, lr=3e-3,
               hard_negatives=HardNegativeConfig(enabled=False))
    res = train_retriever(data["train"], data["valid"], cfg)
    before = recall_of(embed_split(load_encoder(tmp_path / "tiny", device="cpu"), data["valid"], "fused"))
    after = recall_of(embed_split(load_encoder(res.model_dir, device="cpu"), data["valid"], "fused"))
    assert after["MeanRecall"] > before["MeanRecall"] + 5


@pytest.mark.parametrize("grad_cache_chunk", [None, 3])
def test_mixed_precision_runs_the_towers_under_autocast(data, tmp_path, monkeypatch, grad_cache_chunk):
    """bf16 configs must train in bf16: the towers bypass accelerate's forward wrapper."""
    import torch

    from ecomcap.retrieval.model.dual import DualEncoder

    seen = []
    real = DualEncoder.embed_text

    def spy(self, inputs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, inputs)

    monkeypatch.setattr(DualEncoder, "embed_text", spy)
    cfg = _cfg(tmp_path, f"bf16_{grad_cache_chunk}", max_steps=1, eval_every=0, save_every=0,
               mixed_precision="bf16", grad_cache_chunk=grad_cache_chunk,
               hard_negatives=HardNegativeConfig(enabled=False))
    train_retriever(data["train"], None, cfg)
    assert seen and all(seen)


def test_hard_negative_mining_streams_the_gallery(data, tmp_path, monkeypatch):
    """Mining embeds the train items batch by batch, never the whole gallery decoded at once."""
    from ecomcap.retrieval.model.encoder import Encoder
    from ecomcap.retrieval.train import loop as train

    sizes = []
    real = Encoder.encode_items

    def spy(self, images, texts, *args, **kwargs):
        sizes.append(len(images))
        return real(self, images, texts, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_items", spy)
    monkeypatch.setattr(train, "MINING_BATCH", 8)
    cfg = _cfg(tmp_path, "stream", max_steps=1, eval_every=0, save_every=0,
               hard_negatives=HardNegativeConfig(enabled=True, start_step=0, per_query=2))
    train_retriever(data["train"], None, cfg)
    assert sum(sizes) > 8 and max(sizes) <= 8
    assert (tmp_path / "stream" / "hard_negatives.json").is_file()
