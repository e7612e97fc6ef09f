"""Batch captioning uses the prompt the model learnt (its inference.json, or an SFT/SCST output's
training_config.json), not the run config's: a champion captioned under an instruction it never
saw writes worse captions, silently. A model that records no prompt (a hub checkpoint) gets the
config's, and finished parts are keyed by the prompt actually used."""
import logging
import shutil

import pytest

from ecomcap.config import GenerateConfig
from ecomcap.inference.batch import caption_dataset, caption_share, merge_dataset
from ecomcap.training.collate import PromptBuilder

TRAINED = "训练时的提示。"  # the instruction the model was trained / exported with
CONFIG = "描述商品。"  # the run config's (configs/local.yaml's) instruction
GEN = GenerateConfig(num_beams=1, max_new_tokens=3, batch_size=3)
GEN = GEN.model_copy(update={"chunks": GEN.chunks.model_copy(update={"chunk_size": 3, "workers": 1})})


@pytest.fixture
def prompts_used(monkeypatch):
    """Every prompt a PromptBuilder is made with (a spy: the real builder still runs)."""
    seen: list[str] = []
    real = PromptBuilder.__init__

    def spy(self, processor, prompt):
        seen.append(prompt)
        real(self, processor, prompt)

    monkeypatch.setattr(PromptBuilder, "__init__", spy)
    return seen


@pytest.fixture(scope="module")
def exported(tiny_model_cfg, tmp_path_factory):
    """A registered-style directory whose inference.json records TRAINED."""
    from ecomcap.registry.pyfunc import export_merged

    cfg = tiny_model_cfg.model_copy(update={"prompt": TRAINED})
    return export_merged(tiny_model_cfg.name_or_path, tmp_path_factory.mktemp("exp") / "model_dir", cfg, GEN)


def _sft_output(tiny_model_cfg, out, prompt):
    """What an SFT/SCST stage exports (marker + training_config.json), trained under `prompt`."""
    from ecomcap.modeling.load import load_base
    from ecomcap.training.checkpoint import export_model

    model, processor = load_base(tiny_model_cfg)
    configs = {"model": tiny_model_cfg.model_copy(update={"prompt": prompt}).model_dump(mode="json")}
    return export_model(model, processor, out, base=tiny_model_cfg.name_or_path, strategy="full", configs=configs)


@pytest.fixture(scope="module")
def sft_best(tiny_model_cfg, tmp_path_factory):
    return _sft_output(tiny_model_cfg, tmp_path_factory.mktemp("sft") / "best", TRAINED)


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "prompt" in r.getMessage()]


def test_exported_model_is_captioned_with_its_recorded_prompt(exported, tiny_model_cfg, small_data, tmp_path,
                                                              prompts_used, caplog):
    caplog.set_level(logging.WARNING)
    cfg = tiny_model_cfg.model_copy(update={"prompt": CONFIG})
    preds = caption_dataset(exported, cfg, small_data["test"], tmp_path / "o.jsonl", GEN)
    assert preds and set(prompts_used) == {TRAINED}
    (msg,) = _warned(caplog)
    assert TRAINED in msg and CONFIG in msg


def test_cli_generate_on_an_sft_output_uses_its_training_prompt(sft_best, small_data, tmp_path, prompts_used,
                                                                caplog):
    from ecomcap.cli import main

    caplog.set_level(logging.WARNING)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"model:\n  device: cpu\n  prompt: {CONFIG}\ngenerate:\n  num_beams: 1\n  max_new_tokens: 3\n",
                    encoding="utf-8")
    assert main(["generate", "--model", str(sft_best), "--data", str(small_data["test"]),
                 "--out", str(tmp_path / "o.jsonl"), "--config", str(yaml)]) == 0
    assert set(prompts_used) == {TRAINED}
    assert any(TRAINED in m and CONFIG in m for m in _warned(caplog))


def test_model_without_a_recorded_prompt_uses_the_config_prompt(tiny_model_cfg, small_data, tmp_path,
                                                                  prompts_used, caplog):
    caplog.set_level(logging.WARNING)
    cfg = tiny_model_cfg.model_copy(update={"prompt": CONFIG})
    caption_dataset(tiny_model_cfg.name_or_path, cfg, small_data["test"], tmp_path / "o.jsonl", GEN)
    assert set(prompts_used) == {CONFIG}
    assert not _warned(caplog)


def test_matching_config_prompt_is_used_without_a_warning(exported, tiny_model_cfg, small_data, tmp_path,
                                                         prompts_used, caplog):
    caplog.set_level(logging.WARNING)
    cfg = tiny_model_cfg.model_copy(update={"prompt": TRAINED})
    caption_dataset(exported, cfg, small_data["test"], tmp_path / "o.jsonl", GEN)
    assert set(prompts_used) == {TRAINED} and not _warned(caplog)


def test_fan_out_shares_and_merge_agree_on_the_recorded_prompt(sft_best, tiny_model_cfg, small_data, tmp_path,
                                                               prompts_used):
    """Shares run under one config prompt, the merge under another: both find the same parts,
    those captioned under the prompt the model recorded."""
    parts = tmp_path / "parts"
    for i in range(2):
        caption_share(sft_best, tiny_model_cfg.model_copy(update={"prompt": CONFIG}), small_data["test"], GEN, i, 2,
                      parts)
    assert set(prompts_used) == {TRAINED}
    merged = merge_dataset(sft_best, tiny_model_cfg, small_data["test"], tmp_path / "m.jsonl", GEN, parts)
    assert len(merged) >= 1


def test_parts_of_another_trained_prompt_are_not_reused(sft_best, tiny_model_cfg, small_data, tmp_path):
    """The same weights trained under another prompt (training_config.json is not part of the
    model fingerprint) must caption again, not pick up the first model's parts."""
    parts, cfg = tmp_path / "parts", tiny_model_cfg.model_copy(update={"prompt": CONFIG})
    caption_dataset(sft_best, cfg, small_data["test"], tmp_path / "a.jsonl", GEN, parts)
    caption_dataset(sft_best, cfg.model_copy(update={"prompt": "另一个配置提示。"}), small_data["test"],
                    tmp_path / "b.jsonl", GEN, parts, stop_after_chunks=0)  # same trained prompt: reused
    other = tmp_path / "other"
    shutil.copytree(sft_best, other)
    cfg_json = other / "training_config.json"
    cfg_json.write_text(cfg_json.read_text(encoding="utf-8").replace(TRAINED, "别的训练提示。"), encoding="utf-8")
    with pytest.raises(InterruptedError):  # would not raise if the first model's parts were reused
        caption_dataset(other, cfg, small_data["test"], tmp_path / "c.jsonl", GEN, parts, stop_after_chunks=0)


def test_export_records_the_prompt_the_source_learnt(sft_best, tiny_model_cfg, tmp_path):
    """Registering an SFT/SCST output under a config whose prompt changed since records the
    prompt the model was trained with, which the pyfunc and the gate's re-scoring then use."""
    import json

    from ecomcap.registry.pyfunc import INFERENCE_FILE, export_merged

    out = export_merged(sft_best, tmp_path / "merged", tiny_model_cfg.model_copy(update={"prompt": CONFIG}), GEN)
    assert json.loads((out / INFERENCE_FILE).read_text(encoding="utf-8"))["prompt"] == TRAINED


def test_worker_processes_caption_under_the_recorded_prompt(exported, tiny_model_cfg, small_data, tmp_path):
    """Workers get the config carrying the recorded prompt: their parts are those of a
    one-process run under that prompt (found again, nothing captioned twice)."""
    parts = tmp_path / "parts"
    two = GEN.model_copy(update={"chunks": GEN.chunks.model_copy(update={"chunk_size": 2, "workers": 2})})
    one = two.model_copy(update={"chunks": two.chunks.model_copy(update={"workers": 1})})
    first = caption_dataset(exported, tiny_model_cfg.model_copy(update={"prompt": CONFIG}), small_data["test"],
                            tmp_path / "a.jsonl", two, parts)
    again = caption_dataset(exported, tiny_model_cfg.model_copy(update={"prompt": TRAINED}), small_data["test"],
                            tmp_path / "b.jsonl", one, parts, stop_after_chunks=0)
    assert again == first and len(list(parts.iterdir())) == 1


def test_an_inference_file_without_a_prompt_falls_through_to_the_training_config(tmp_path):
    import json

    from ecomcap.inference.prompt import INFERENCE_FILE, TRAINING_CONFIG, recorded_prompt

    (tmp_path / INFERENCE_FILE).write_text(json.dumps({"generate": {}}), encoding="utf-8")
    (tmp_path / TRAINING_CONFIG).write_text(json.dumps({"model": {"prompt": "训练时的提示。"}}), encoding="utf-8")
    assert recorded_prompt(tmp_path) == "训练时的提示。"
