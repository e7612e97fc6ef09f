"""max_new_tokens from the data: the 99th percentile reference length in the model's tokens (+ EOS
and a margin), counted once per dataset and tokenizer, recorded by SFT in the exported model and
used by generate and SCST when their config leaves max_new_tokens unset; an explicit value wins."""
import json
import math
import shutil

import pytest

from ecomcap.config import FinetuneConfig, GenerateConfig
from ecomcap.data import lengths
from ecomcap.data.lengths import CACHE, decode_length, reference_lengths
from ecomcap.data.shards import read_references
from ecomcap.inference.generate import with_decode_length
from ecomcap.modeling.load import load_trained, read_output_marker
from ecomcap.modeling.processor import load_processor
from ecomcap.training.sft import run_sft
from tests.test_sft import _cfg


def test_the_length_is_the_99th_percentile_in_model_tokens_and_cached(tiny_model_cfg, small_data, monkeypatch,
                                                                      tmp_path):
    tok = load_processor(tiny_model_cfg.name_or_path).tokenizer
    (small_data["train"] / CACHE).unlink(missing_ok=True)
    texts = [t for refs in read_references(small_data["train"]).values() for t in refs]
    counts = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    p99 = counts[math.ceil(0.99 * len(counts)) - 1]
    assert decode_length(small_data["train"], tok) == p99 + 1 + max(4, math.ceil(0.1 * p99))
    cached = json.loads((small_data["train"] / CACHE).read_text())
    assert cached["p99"] == p99 and cached["n"] == len(texts) and cached["max"] == counts[-1]
    real = lengths.read_references
    monkeypatch.setattr(lengths, "read_references", lambda d: pytest.fail("counted again"))
    assert reference_lengths(small_data["train"], tok)["p99"] == p99  # from the cache
    copy = tmp_path / "reingested"  # the same folder ingested again from other data: counted again
    shutil.copytree(small_data["train"], copy)
    report = json.loads((copy / "report.json").read_text())
    (copy / "report.json").write_text(json.dumps({**report, "fingerprint": "other data"}))
    calls = []
    monkeypatch.setattr(lengths, "read_references", lambda d: calls.append(d) or real(d))
    assert reference_lengths(copy, tok)["p99"] == p99 and calls == [copy]


def test_sft_records_the_length_and_generate_uses_it_unless_set(tiny_model_cfg, small_data, tmp_path, caplog):
    res = run_sft(small_data["train"], None, tiny_model_cfg, FinetuneConfig(strategy="lora"),
                  _cfg(tmp_path / "sft", eval_every=0, max_steps=2, save_every=0), GenerateConfig(num_beams=1))
    tok = load_processor(tiny_model_cfg.name_or_path).tokenizer
    want = decode_length(small_data["train"], tok)
    assert read_output_marker(res.model_dir)["max_new_tokens"] == want
    model, _ = load_trained(res.model_dir, tiny_model_cfg)
    assert with_decode_length(GenerateConfig(), model).max_new_tokens == want
    assert with_decode_length(GenerateConfig(max_new_tokens=7), model).max_new_tokens == 7
    base, _ = load_trained(tiny_model_cfg.name_or_path, tiny_model_cfg)  # nothing recorded: 40
    assert with_decode_length(GenerateConfig(), base).max_new_tokens == lengths.FALLBACK_NEW_TOKENS
    from ecomcap.training.tuning import start_decode_length

    assert start_decode_length(res.model_dir, small_data["train"]) == want  # SCST / DPO: the start model's
    assert start_decode_length(tiny_model_cfg.name_or_path, small_data["train"]) == want  # else the data's

    from ecomcap.registry.pyfunc import INFERENCE_FILE, export_merged

    served = export_merged(res.model_dir, tmp_path / "served", tiny_model_cfg, GenerateConfig())
    assert json.loads((served / INFERENCE_FILE).read_text())["generate"]["max_new_tokens"] == want
    assert read_output_marker(served)["max_new_tokens"] == want  # the registered model decodes as evaluated

    import logging

    from ecomcap.config import RunConfig
    from ecomcap.registry.pyfunc import as_recorded

    cfg = RunConfig().model_copy(update={"model": tiny_model_cfg})
    with caplog.at_level(logging.WARNING, logger="ecomcap.registry.pyfunc"):
        assert as_recorded(cfg, served).generate.max_new_tokens == want  # unset: no "other settings" warning
    assert "records its own decoding" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="ecomcap.registry.pyfunc"):
        as_recorded(cfg.model_copy(update={"generate": GenerateConfig(max_new_tokens=7)}), served)
    assert "records its own decoding" in caplog.text


def test_scst_samples_as_long_as_its_start_model_recorded(tiny_model_cfg, small_data, tmp_path):
    from ecomcap.training.scst import run_scst
    from tests.test_scst import _scst_cfg

    sft = run_sft(small_data["train"], None, tiny_model_cfg, FinetuneConfig(strategy="lora"),
                  _cfg(tmp_path / "sft", eval_every=0, max_steps=1, save_every=0), GenerateConfig(num_beams=1))
    want = read_output_marker(sft.model_dir)["max_new_tokens"]
    res = run_scst(sft.model_dir, small_data["train"], None, tiny_model_cfg,
                   _scst_cfg(tmp_path / "scst", max_steps=1, save_every=0, max_new_tokens=None))
    trained = json.loads((res.model_dir / "training_config.json").read_text())
    assert trained["scst"]["max_new_tokens"] == want == trained["generate"]["max_new_tokens"]
    assert read_output_marker(res.model_dir)["max_new_tokens"] == want  # handed on to generate
    explicit = run_scst(sft.model_dir, small_data["train"], None, tiny_model_cfg,
                        _scst_cfg(tmp_path / "scst6", max_steps=1, save_every=0, max_new_tokens=6))
    assert json.loads((explicit.model_dir / "training_config.json").read_text())["scst"]["max_new_tokens"] == 6
