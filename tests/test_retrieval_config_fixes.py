"""Retrieval config fixes: a tokenizer that cannot read Chinese queries is refused, the GPU configs
take their precision from the device, and both jobs share one source fingerprint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ecomcap.config import DataConfig, load_run_config
from ecomcap.config_encoders import EncoderConfig
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.config import RetrievalDataConfig, RetrievalRunConfig, TinyEncoderConfig
from ecomcap.retrieval.model.vocab_check import SAMPLE_QUERIES, check_vocabulary, unknown_share

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = TinyEncoderConfig(hidden=32, layers=1, heads=2, projection_dim=16, image_size=32, patch_size=8)
ENGLISH = ["red cotton dress", "blue silk shirt", "green hat black shoes white socks"]


def _spiece(tmp_path: Path, lines: list[str], name: str) -> Path:
    """A SentencePiece model trained here, laid out like SigLIP's spiece.model (</s>=1, <unk>=2)."""
    import sentencepiece as spm

    corpus = tmp_path / f"{name}.txt"
    corpus.write_text("\n".join(lines * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / name), vocab_size=64,
                                   model_type="unigram", pad_id=-1, unk_id=2, bos_id=-1, eos_id=1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return tmp_path / f"{name}.model"


# --- the vocabulary check ---------------------------------------------------------------------

def test_english_wordpiece_and_bpe_vocabularies_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
                                "red", "dress", "cotton", "shirt", "black", "leather", "##s"]) + "\n", encoding="utf-8")
    wordpiece = BertTokenizer(vocab_file=str(vocab))
    bpe_model = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe_model.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe_model.train_from_iterator(ENGLISH * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    bpe = PreTrainedTokenizerFast(tokenizer_object=bpe_model, unk_token="<unk>")
    for tok in (wordpiece, bpe):
        assert unknown_share(tok, SAMPLE_QUERIES) > 0.9
        with pytest.raises(EcomcapError, match="english-only-ckpt: .* unknown tokens .*multilingual") as err:
            check_vocabulary(tok, "english-only-ckpt", 0.3)
        assert "\n" not in str(err.value) and "google/siglip-base-patch16-256-multilingual" in str(err.value)


def test_sentencepiece_counts_every_character_of_a_merged_unknown_run(tmp_path):
    """SentencePiece merges an unknown run into one <unk> (google/sentencepiece#854): counted per
    character, 17 of the samples' 18 characters are unknown to an English vocabulary (only T is known)."""
    from transformers import SiglipTokenizer

    english = SiglipTokenizer(vocab_file=str(_spiece(tmp_path, ENGLISH, "en")))
    assert english("红色连衣裙")["input_ids"].count(english.unk_token_id) == 1  # five characters, one id
    assert unknown_share(english, SAMPLE_QUERIES) == pytest.approx(17 / 18)
    chinese = SiglipTokenizer(vocab_file=str(_spiece(tmp_path, ENGLISH + list(SAMPLE_QUERIES), "zh")))
    assert check_vocabulary(chinese, "multilingual-ckpt", 0.3) == 0.0
    assert unknown_share(english, ["  "]) == 0.0  # no characters: nothing unknown


def test_the_tiny_char_tokenizers_pass():
    """Built from the synthetic set's words (what a local run builds): only the characters the
    samples add from outside that domain (棉, 皮, 革, 手, 提) are unknown."""
    from ecomcap.modeling.tiny import build_tokenizer
    from ecomcap.retrieval.data.swaps import synthetic_vocab
    from ecomcap.retrieval.model.tiny import build_char_tokenizer

    words = [w for ws in synthetic_vocab().values() for w in ws]
    for tok in (build_char_tokenizer(words, 52), build_tokenizer(words)):
        assert check_vocabulary(tok, "tiny", EncoderConfig().max_unknown_share) == pytest.approx(5 / 18)
        assert unknown_share(tok, SAMPLE_QUERIES[:1]) == 0.0


def _hub_siglip(tmp_path: Path, lines: list[str], name: str) -> Path:
    """A directory laid out like a hub SigLIP checkpoint (spiece.model, no tiny marker)."""
    from ecomcap.retrieval.model.tiny import MARKER, build_tiny_encoder

    out = build_tiny_encoder(tmp_path / name, "siglip", ["abcdefghijklmnopqrstuvwxyz"], SMALL, 64)
    _spiece(tmp_path, lines, name).rename(out / "spiece.model")
    for f in ("tokenizer.json", "special_tokens_map.json", MARKER):
        (out / f).unlink(missing_ok=True)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer",
                                                           "model_max_length": 64}), encoding="utf-8")
    return out


def test_loading_a_pretrained_english_tokenizer_is_refused_in_one_line(tmp_path):
    from ecomcap.retrieval.model.encoder import load_encoder, load_preprocessor

    english = _hub_siglip(tmp_path, ENGLISH, "en")
    with pytest.raises(EcomcapError, match=f"{english}: its tokenizer maps 94% .*limit 30%"):
        load_preprocessor(english, "siglip", 64)
    with pytest.raises(EcomcapError, match="max_unknown_share"):
        load_encoder(english, device="cpu")
    assert load_encoder(english, device="cpu", max_unknown_share=1.0).encode_texts(["red dress"]).shape[0] == 1
    chinese = _hub_siglip(tmp_path, ENGLISH + list(SAMPLE_QUERIES), "zh")
    assert load_encoder(chinese, device="cpu").encode_texts(["红色连衣裙"]).shape[0] == 1


def test_a_tiny_models_vocabulary_comes_from_its_data_and_its_export_says_so(tmp_path):
    """A tiny encoder's characters come from the run's texts: not checked against other domains'
    queries, neither as built nor once exported (retrieval.json records it)."""
    from ecomcap.retrieval.model.encoder import load_encoder, save_encoder
    from ecomcap.retrieval.model.tiny import build_tiny_encoder

    enc = load_encoder(build_tiny_encoder(tmp_path / "tiny", "clip", ENGLISH, SMALL), device="cpu")
    assert enc.pre.vocab_from_data
    out = save_encoder(enc.dual, enc.pre, tmp_path / "export")
    assert json.loads((out / "retrieval.json").read_text(encoding="utf-8"))["vocab_from_data"] is True
    assert load_encoder(out, device="cpu").pre.vocab_from_data


def test_the_threshold_is_an_encoder_setting():
    assert EncoderConfig().max_unknown_share == 0.3
    assert EncoderConfig(max_unknown_share=1.0).max_unknown_share == 1.0
    with pytest.raises(ValueError, match="max_unknown_share"):
        EncoderConfig(max_unknown_share=1.5)


def test_the_siglip_config_names_the_multilingual_checkpoint():
    cfg = load_run_config(CONFIGS / "retrieval_siglip_b16.yaml", RetrievalRunConfig)
    assert cfg.encoder.arch == "siglip" and cfg.encoder.name_or_path == "google/siglip-base-patch16-256-multilingual"
    assert cfg.encoder.max_text_len == 64  # SigLIP's text positions; the checkpoint's 256 px come with its processor
    assert cfg.encoder.max_unknown_share == 0.3


# --- precision from the device ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["retrieval_siglip_b16.yaml", "retrieval_chinese_clip_b16.yaml"])
def test_gpu_configs_take_the_precision_from_the_device(name):
    assert load_run_config(CONFIGS / name, RetrievalRunConfig).train.mixed_precision == "auto"


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory):
    """A retrieval encoder as the loop gets it: fp32 weights (the resolver looks at their dtype)."""
    from ecomcap.retrieval.model.dual import load_dual_encoder
    from ecomcap.retrieval.model.tiny import build_tiny_encoder

    dual = load_dual_encoder(build_tiny_encoder(tmp_path_factory.mktemp("enc") / "t", "siglip", ["红色"], SMALL))
    assert {p.dtype for p in dual.model.parameters()} == {torch.float32}
    return dual.model


def auto_precision(model: torch.nn.Module, cuda_available: bool, bf16_supported: bool) -> str:
    """What the one resolver (the captioning job's, under the shared loop) picks for `auto` on a
    device with these facts. No GPU here and CUDA is not mocked: make_accelerator passes
    bf16_ok = cuda_available and bf16_supported, cuda_ok = cuda_available."""
    from ecomcap.training.loop import resolve_precision

    return resolve_precision("auto", model, bf16_ok=cuda_available and bf16_supported, cuda_ok=cuda_available)


@pytest.mark.parametrize(("cuda_available", "bf16_supported", "expected"), [
    (True, True, "bf16"),    # A100, H100, H200
    (False, False, "no"),    # CPU: fp32
])
def test_auto_precision_follows_the_device(encoder_weights, cuda_available, bf16_supported, expected):
    assert auto_precision(encoder_weights, cuda_available, bf16_supported) == expected


def test_auto_precision_is_fp16_on_a_gpu_without_bf16(encoder_weights):
    assert auto_precision(encoder_weights, cuda_available=True, bf16_supported=False) == "fp16"


# --- one source fingerprint -------------------------------------------------------------------

def test_both_jobs_call_one_fingerprint(tmp_path):
    from ecomcap.data.fingerprint import source_fingerprint
    from ecomcap.retrieval.data import prepare
    from ecomcap.workflow import source_fingerprint as captioning

    assert captioning is source_fingerprint and prepare.retrieval_source_fingerprint is source_fingerprint
    (tmp_path / "MR_train_queries.jsonl").write_text("{}\n", encoding="utf-8")
    caption, retrieval = DataConfig(source="dir", src_dir=tmp_path), RetrievalDataConfig(source="muge", src_dir=tmp_path)
    assert len(source_fingerprint(retrieval)) == 16 and source_fingerprint(retrieval) == source_fingerprint(caption)
    assert source_fingerprint(RetrievalDataConfig()) != source_fingerprint(RetrievalDataConfig(synth={"seed": 1}))
    before = source_fingerprint(retrieval)
    (tmp_path / "MR_train_imgs.tsv").write_text("1\tabc\n", encoding="utf-8")
    assert source_fingerprint(retrieval) != before
    assert source_fingerprint(retrieval.model_copy(update={"ingest": retrieval.ingest.model_copy(
        update={"min_side": 64})})) != source_fingerprint(retrieval)


def test_a_manifest_stands_for_remote_retrieval_data(tmp_path):
    from ecomcap.data.fingerprint import source_fingerprint

    manifest = tmp_path / "muge.manifest.json"
    manifest.write_text('{"MR_train_imgs.tsv": "sha256:aaa"}', encoding="utf-8")
    data = RetrievalDataConfig(source="muge", src_dir=Path("/data/muge_mr_only_on_the_cluster"), manifest=manifest)
    before = source_fingerprint(data)
    manifest.write_text('{"MR_train_imgs.tsv": "sha256:bbb"}', encoding="utf-8")
    assert source_fingerprint(data) != before
    with pytest.raises(EcomcapError, match="data.manifest .* does not exist"):
        source_fingerprint(data.model_copy(update={"manifest": tmp_path / "missing.json"}))


def test_unseen_retrieval_data_without_a_manifest_warns(tmp_path, caplog):
    from ecomcap.data.fingerprint import source_fingerprint

    with caplog.at_level(logging.WARNING, logger="ecomcap.data.fingerprint"):
        assert len(source_fingerprint(RetrievalDataConfig(source="muge"))) == 16
    assert "no data.manifest is set" in caplog.text
