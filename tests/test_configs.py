"""Every shipped config loads into the one run model (unknown keys are errors)."""
from pathlib import Path

import pytest

from ecomcap.config import RunConfig, load_run_config
from ecomcap.errors import EcomcapError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    if path.name.startswith("retrieval_index"):  # the catalogue index job's configs
        from ecomcap.retrieval.index.catalogue import IndexJobConfig

        cfg = load_run_config(path, IndexJobConfig)
        assert cfg.catalogue.encoder == "champion" and cfg.index.min_recall >= 0.98
        return
    if path.name.startswith("retrieval_"):  # the second job's run model
        from ecomcap.retrieval.config import RetrievalRunConfig

        cfg = load_run_config(path, RetrievalRunConfig)
        assert cfg.encoder.trust_remote_code is False
        assert cfg.train.mixed_precision in ("auto", "no")  # bf16 only where the device has it (auto)
        return
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.trust_remote_code is False  # no downloaded code runs unless a config says so


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"local.yaml", "qwen25vl_3b_lora.yaml", "qwen25vl_7b_qlora.yaml", "ad_caption.yaml"} <= names


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("sft:\n  max_step: 3\n", encoding="utf-8")
    with pytest.raises(EcomcapError, match="sft.max_step"):
        load_run_config(p)


def test_gate_metrics_are_checked_when_the_config_loads(tmp_path):
    """A typo in the gate's metrics fails at load time with one line, not at promote after training."""
    p = tmp_path / "x.yaml"
    p.write_text("registry:\n  guard_metrics: [BLEU4]\n", encoding="utf-8")
    with pytest.raises(EcomcapError, match="guard_metrics"):
        load_run_config(p)
    p.write_text("registry:\n  primary_metric: BLEU-4\n", encoding="utf-8")  # corpus BLEU is no mean
    with pytest.raises(EcomcapError, match="primary_metric"):
        load_run_config(p)


def test_speed_only_settings_do_not_change_the_config_hash():
    """`retrain --if-changed` compares this hash: the prompt cache size must not trigger a retrain."""
    from ecomcap.config import RunConfig
    from ecomcap.registry.tracking import config_hash

    base = RunConfig()
    faster = base.model_copy(update={"sft": base.sft.model_copy(update={"prompt_cache_mb": 0})})
    other = base.model_copy(update={"sft": base.sft.model_copy(update={"lr": base.sft.lr * 2})})
    assert config_hash(faster) == config_hash(base) != config_hash(other)
