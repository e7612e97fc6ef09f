"""Model layer: the tiny model loads through the real path; strategies train only their part."""
import json
import shutil

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from ecomcap.config import FinetuneConfig
from ecomcap.errors import EcomcapError
from ecomcap.modeling.load import load_base, load_trained
from ecomcap.modeling.processor import suppressed_token_ids
from ecomcap.modeling.strategies import apply_strategy, lora_target_regex, quantization_config
from ecomcap.training.collate import IGNORE, PromptBuilder, answer_logits, with_answers
from ecomcap.training.data import ShardImages
from ecomcap.training.losses import sft_loss


def _batch(cfg, data_dir, n=4):
    model, processor = load_base(cfg)
    data = ShardImages(data_dir)
    pb = PromptBuilder(processor, cfg.prompt)
    prompts = pb.prompts([data.image(i) for i in range(n)])
    batch = with_answers(prompts, pb.answer_ids([data.texts[i][0] for i in range(n)], 64), pb.pad_id)
    return model, processor, pb, batch


def test_tiny_model_loads_through_the_real_classes(tiny_model_cfg, small_data):
    model, processor, pb, batch = _batch(tiny_model_cfg, small_data["train"])
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert "<|image_pad|>" in pb.text and pb.text.endswith("assistant\n")
    mm = batch.inputs["mm_token_type_ids"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(mm.bool(), batch.inputs["input_ids"] == image_id)
    assert int(mm[0].sum()) == 16  # 112 px -> 8x8 patches -> 16 merged image tokens
    assert set(suppressed_token_ids(processor)) >= {image_id}


def test_answers_are_the_only_labels_and_end_every_row(tiny_model_cfg, small_data):
    _, processor, pb, batch = _batch(tiny_model_cfg, small_data["train"])
    labels, ids, mask = batch.labels, batch.inputs["input_ids"], batch.inputs["attention_mask"]
    for i in range(labels.shape[0]):
        lab = labels[i][labels[i] != IGNORE]
        assert lab[-1] == pb.eos_id
        assert torch.equal(ids[i, -len(lab):], lab)  # answers are right-aligned
        assert mask[i, -1] == 1 and mask[i, 0] in (0, 1)
    text = processor.tokenizer.decode(labels[0][labels[0] != IGNORE][:-1])
    assert text == ShardImages(small_data["train"]).texts[0][0][: len(text)]


def test_3d_positions_are_used(tiny_model_cfg, small_data):
    """Without mm_token_type_ids Qwen2.5-VL silently uses 1D positions: logits must differ."""
    model, _, _, batch = _batch(tiny_model_cfg, small_data["train"], n=2)
    with torch.no_grad():
        with_mm, _ = answer_logits(model, batch)
        inputs = {k: v for k, v in batch.inputs.items() if k != "mm_token_type_ids"}
        without = model(**inputs, use_cache=False, logits_to_keep=batch.answer_len + 1).logits[:, :-1]
    assert not torch.allclose(with_mm, without.float(), atol=1e-4)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_steps(model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        logits, targets = answer_logits(model, batch)
        loss = sft_loss(logits, targets, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize(
    "strategy,should_change",
    [
        ("lora", lambda n: "lora_" in n),
        ("partial", lambda n: ".language_model.layers.1." in n),
        ("freeze_llm", lambda n: ".visual.merger." in n),
        ("full", lambda n: True),
    ],
)
def test_each_strategy_changes_only_its_parameters(tiny_model_cfg, small_data, strategy, should_change):
    model, _, _, batch = _batch(tiny_model_cfg, small_data["train"])
    cfg = FinetuneConfig(strategy=strategy, partial_layers=(1, 1), lora_r=4)
    model, counts = apply_strategy(model, cfg)
    assert 0 < counts.trainable <= counts.total
    before = _snapshot(model)
    _train_steps(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if should_change(n)}
    assert changed, strategy
    assert changed <= expected, sorted(changed - expected)[:5]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected if strategy != "full" else trainable == set(before)


def test_lora_targets_the_language_model_only():
    rx = lora_target_regex(FinetuneConfig())
    import re

    assert re.fullmatch(rx, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(rx, "model.language_model.layers.3.mlp.down_proj")
    assert not re.fullmatch(rx, "model.visual.blocks.0.mlp.down_proj")
    assert re.fullmatch(rx, "model.language_model.layers.3.mlp.gate_proj")  # every MLP projection
    assert re.fullmatch(lora_target_regex(FinetuneConfig(lora_vision=True)), "model.visual.blocks.0.attn.qkv")


def test_qlora_on_cpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU error path does not apply")
    with pytest.raises(EcomcapError, match="needs a CUDA GPU"):
        quantization_config(FinetuneConfig(strategy="qlora"))


def test_partial_layers_out_of_range(tiny_model_cfg):
    model, _ = load_base(tiny_model_cfg)
    with pytest.raises(EcomcapError, match="outside the model"):
        apply_strategy(model, FinetuneConfig(strategy="partial", partial_layers=(16, 31)))


def test_missing_or_corrupt_model_directory(tiny_model_cfg, tmp_path):
    cfg = tiny_model_cfg
    with pytest.raises(EcomcapError, match="does not exist"):
        load_base(cfg.model_copy(update={"name_or_path": str(tmp_path / "nope")}))
    broken = tmp_path / "broken"
    shutil.copytree(cfg.name_or_path, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(EcomcapError, match="no weights"):
        load_base(cfg.model_copy(update={"name_or_path": str(broken)}))
    shutil.copy(f"{cfg.name_or_path}/model.safetensors", broken / "model.safetensors")
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(EcomcapError, match="cannot load model"):
        load_base(cfg.model_copy(update={"name_or_path": str(broken)}))
    (broken / "model.safetensors").write_bytes(b"garbage")
    shutil.copy(f"{cfg.name_or_path}/config.json", broken / "config.json")
    with pytest.raises(EcomcapError, match="cannot load model"):
        load_base(cfg.model_copy(update={"name_or_path": str(broken)}))
    (broken / "ecomcap_model.json").write_text(json.dumps({"kind": "adapter", "base": cfg.name_or_path}))
    with pytest.raises(EcomcapError, match="no adapter_config.json"):
        load_trained(broken, cfg)
