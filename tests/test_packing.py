"""Padding-free packing: the rows of a micro-batch as one sequence give the padded batch's loss
and gradients (mixed image sizes: very different row lengths; LoRA on the real tiny Qwen2.5-VL),
with the head at the answer positions only; an SFT run with packing follows the padded one."""
import json

import pytest
import torch

from ecomcap.config import FinetuneConfig
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.answer_loss import answer_loss
from ecomcap.training.collate import with_answers
from ecomcap.training.packing import pack
from ecomcap.training.sft import run_sft
from tests.test_prefill import SIZES, _images, _model
from tests.test_sft import GEN, _cfg


@pytest.mark.parametrize("chunk", [0, 8])
def test_packed_equals_padded_loss_and_gradients(tiny_model_cfg, chunk):
    model, pb = _model(tiny_model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.0))
    batch = with_answers(pb.prompts(_images(SIZES)), pb.answer_ids(
        ["红色条纹T恤", "蓝色纯色连衣裙，简约", "白色", "黑色印花卫衣", "灰色格子衬衫"], 32), pb.pad_id)
    mask = batch.inputs["attention_mask"]
    assert (mask == 0).sum() > mask.numel() // 4  # a quarter or more of the padded batch is padding
    inputs, labels = pack(model, batch)
    assert inputs["input_ids"].shape == (1, int(mask.sum())) and "attention_mask" not in inputs
    assert int((inputs["position_ids"][0, 0] == 0).sum()) == len(SIZES)  # positions restart per example
    params = [p for p in model.parameters() if p.requires_grad]
    padded = answer_loss(model, batch, 0.1, chunk)
    want = torch.autograd.grad(padded, params)
    packed = answer_loss(model, batch, 0.1, chunk, packed=True)
    got = torch.autograd.grad(packed, params)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_with_packing_follows_the_padded_run(tiny_model_cfg, small_data, tmp_path):
    ft = FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.0)
    runs = [run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / str(p), eval_every=0, max_steps=3,
                                                                         packing=p), GEN) for p in (False, True)]
    losses = [[json.loads(line)["loss"] for line in (r.final_dir.parent / "metrics.jsonl").read_text().splitlines()]
              for r in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
