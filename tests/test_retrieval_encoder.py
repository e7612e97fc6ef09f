"""The encoder API and the gallery artifact (the contract with the vector store / search page)."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from ecomcap.data.shards import DATASET_SCHEMA, RowWriter
from ecomcap.retrieval.config import TinyEncoderConfig
from ecomcap.retrieval.index.gallery import embed_gallery, load_gallery
from ecomcap.retrieval.model.dual import load_dual_encoder
from ecomcap.retrieval.model.encoder import load_encoder, save_encoder
from ecomcap.retrieval.model.tiny import build_tiny_encoder

TEXTS = ["红色 条纹 T恤", "MODA 连衣裙", "蓝色 波点 背包"]
SMALL = TinyEncoderConfig(hidden=32, layers=1, heads=2, projection_dim=16, image_size=32, patch_size=8)


def _jpeg(rgb, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("arch,cls", [("chinese_clip", "ChineseCLIPModel"), ("clip", "CLIPModel"),
                                      ("siglip", "SiglipModel")])
def test_tiny_encoder_of_each_class_loads_and_embeds(tmp_path, arch, cls):
    path = build_tiny_encoder(tmp_path / arch, arch, TEXTS, SMALL)
    enc = load_encoder(path, device="cpu")
    assert type(enc.dual.model).__name__ == cls
    t = enc.encode_texts(TEXTS)
    i = enc.encode_images([Image.new("RGB", (50, 40), (200, 0, 0)), Image.new("L", (30, 30))])
    dim = SMALL.hidden if arch == "siglip" else SMALL.projection_dim  # SigLIP: no projection
    assert t.dtype == np.float32 and t.shape == (3, dim) and i.shape == (2, dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(t[0], t[1])  # different texts, different vectors
    if arch == "siglip":  # SigLIP's from-scratch init, not transformers' zeros
        t_, b = enc.dual.scale_bias()
        assert float(t_) == pytest.approx(np.log(10)) and float(b) == -10.0


def test_saved_encoder_reproduces_embeddings_and_settings(tmp_path):
    path = build_tiny_encoder(tmp_path / "tiny", "chinese_clip", TEXTS, SMALL)
    enc = load_encoder(path, device="cpu")
    out = save_encoder(enc.dual, enc.pre, tmp_path / "exported", item_embedding="fused", fusion_weight=0.7)
    again = load_encoder(out, device="cpu")
    np.testing.assert_allclose(again.encode_texts(TEXTS), enc.encode_texts(TEXTS), atol=1e-6)
    assert again.item_embedding == "fused" and again.fusion_weight == 0.7
    assert load_dual_encoder(out).arch == "chinese_clip"


def _items_dataset(root, rows):
    writer = RowWriter(root / "shards", DATASET_SCHEMA, rows_per_group=2)
    for item_id, data, text in rows:
        writer.add({"image_id": item_id, "image": data, "format": "JPEG", "width": 40, "height": 30,
                    "sha256": "0" * 64, "texts": [text] if text else [], "n_texts": int(bool(text)),
                    "max_text_tokens": len(text)})
    report = {"split": "valid", "rows_ok": writer.rows, "shards": writer.close()}
    (root / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return root


def test_gallery_artifact_format(tmp_path):
    path = build_tiny_encoder(tmp_path / "tiny", "clip", TEXTS, SMALL)
    enc = load_encoder(path, device="cpu")
    enc_dir = save_encoder(enc.dual, enc.pre, tmp_path / "enc", item_embedding="fused", fusion_weight=0.5)
    rows = [("a", _jpeg((255, 0, 0)), "红色 T恤"), ("b", _jpeg((0, 0, 255)), ""), ("c", _jpeg((0, 255, 0)), "背包")]
    items = _items_dataset(tmp_path / "items", rows)
    gal = load_gallery(embed_gallery(enc_dir, items, tmp_path / "gallery", batch_size=2))
    assert gal.item_ids == ["a", "b", "c"] and gal.texts == ["红色 T恤", "", "背包"]
    assert gal.vectors.dtype == np.float32 and gal.vectors.shape == (3, gal.index["dim"])
    np.testing.assert_allclose(np.linalg.norm(gal.vectors, axis=1), 1.0, atol=1e-5)
    assert gal.index["count"] == 3 and gal.index["item_embedding"] == "fused"
    assert gal.index["encoder_dir"] == "encoder" and len(gal.index["fingerprint"]) == 64
    # the vectors are what the shipped encoder computes for those items
    again = gal.encoder(device="cpu")
    pics = [Image.open(io.BytesIO(d)) for _, d, _ in rows]
    np.testing.assert_allclose(gal.vectors, again.encode_items(pics, [t for *_, t in rows]), atol=1e-5)
    assert gal.images(["c"]) == {"c": rows[2][1]}
    # the synthetic-gallery writer identifies the same content the same way (one fingerprint)
    from ecomcap.retrieval.index.gallery import open_gallery, write_gallery

    copy = write_gallery(tmp_path / "copy", np.asarray(gal.vectors), list(zip(gal.item_ids, gal.texts)),
                         [(i, d) for i, d, _ in rows], {"item_embedding": "fused", "fusion_weight": 0.5,
                                                        "encoder_dir": "../gallery/encoder"})
    opened = open_gallery(copy)
    assert opened.index["fingerprint"] == gal.index["fingerprint"] and opened.images(["b"]) == {"b": rows[1][1]}


def test_hub_layout_siglip_dir_loads_its_sentencepiece_tokenizer(tmp_path):
    """google/siglip-base-patch16-224 ships spiece.model + SiglipTokenizer (needs sentencepiece):
    a directory of that layout, weights of the real class, loads through load_encoder."""
    import sentencepiece as spm

    out = build_tiny_encoder(tmp_path / "siglip", "siglip", ["abcdefghijklmnopqrstuvwxyz0123456789"], SMALL, 64)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["red cotton dress", "blue silk shirt", "green hat black shoes white socks"] * 20),
                      encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "spiece"), vocab_size=24,
                                   model_type="unigram", pad_id=-1, unk_id=2, bos_id=-1, eos_id=1,
                                   character_coverage=1.0, minloglevel=2)
    for name in ("tokenizer.json", "special_tokens_map.json", "spiece.vocab"):
        (out / name).unlink(missing_ok=True)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer",
                                                           "model_max_length": 64}), encoding="utf-8")
    enc = load_encoder(out, device="cpu")
    assert "Siglip" in type(enc.pre.tokenizer).__name__
    emb = enc.encode_texts(["red dress", "blue shirt"])
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_ensure_tiny_encoder_rebuilds_when_the_vocabulary_changes(tmp_path):
    from ecomcap.retrieval.model.encoder import load_preprocessor
    from ecomcap.retrieval.model.tiny import ensure_tiny_encoder

    path = ensure_tiny_encoder(tmp_path / "t", "chinese_clip", ["红色 T恤"], SMALL)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_encoder(path, "chinese_clip", ["红色 T恤"], SMALL) == path  # same texts: reused
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    ensure_tiny_encoder(path, "chinese_clip", ["红色 T恤", "蓝色 连衣裙"], SMALL)  # new characters
    tok = load_preprocessor(path, "chinese_clip", 16).tokenizer
    assert tok.unk_token_id not in tok("蓝色连衣裙")["input_ids"]


@pytest.mark.parametrize("size", [32, {"height": 32, "width": 32}])
def test_hub_layout_chinese_clip_dir_with_vocab_txt_and_released_preprocessor(tmp_path, size):
    """OFA-Sys/chinese-clip-*: vocab.txt + BertTokenizer, preprocessor_config.json with
    do_center_crop false (a square resize, no crop); non-square product photos must embed."""
    from transformers import AutoTokenizer

    out = build_tiny_encoder(tmp_path / "cc", "chinese_clip", ["红色条纹T恤连衣裙"], SMALL)
    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    for name in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json", "preprocessor_config.json"):
        (out / name).unlink(missing_ok=True)
    (out / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                           "model_max_length": 52}), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": False, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "ChineseCLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": size}), encoding="utf-8")
    enc = load_encoder(out, device="cpu")
    assert type(enc.pre.tokenizer).__name__.startswith("BertTokenizer")
    ids = enc.pre.texts(["红色连衣裙"])["input_ids"][0].tolist()
    assert enc.pre.tokenizer.unk_token_id not in ids
    wide = Image.new("RGB", (60, 30), "red")
    emb = enc.encode_items([wide, wide.rotate(90, expand=True)], ["红色", "红色"], mode="image")
    assert emb.shape == (2, 16) and np.isfinite(emb).all()
