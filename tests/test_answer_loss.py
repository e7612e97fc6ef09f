"""The chunked answer-only cross-entropy equals the full-logits loss and its gradients (random
tensors, and the real tiny Qwen2.5-VL with LoRA through `answer_loss`), and never holds the whole
batch's vocabulary logits for backward."""
import pytest
import torch

from ecomcap.config import FinetuneConfig
from ecomcap.modeling.load import load_base
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.answer_loss import answer_loss, chunked_cross_entropy
from ecomcap.training.collate import IGNORE, PromptBuilder, answer_logits, with_answers
from ecomcap.training.losses import sft_loss
from tests.test_prefill import SIZES, _images


@pytest.mark.parametrize("chunk,smoothing", [(7, 0.0), (16, 0.1), (1000, 0.1)])
def test_chunked_equals_full_loss_and_gradients(chunk, smoothing):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11), generator=g)
    targets[0, :4] = targets[2, 9:] = IGNORE
    full = sft_loss(torch.nn.functional.linear(hidden, weight, bias), targets, smoothing)
    want = torch.autograd.grad(full, (hidden, weight, bias))
    got_loss = chunked_cross_entropy(hidden, weight, bias, targets, smoothing, chunk)
    got = torch.autograd.grad(got_loss, (hidden, weight, bias))
    torch.testing.assert_close(got_loss, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_answer_loss_on_the_real_model_equals_the_full_path_without_whole_logits(tiny_model_cfg):
    model, processor = load_base(tiny_model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=4))
    model.train()
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    answers = pb.answer_ids(["红色条纹T恤", "蓝色纯色连衣裙，简约", "白色", "黑色印花卫衣", "灰色"], 32)
    batch = with_answers(pb.prompts(_images(SIZES)), answers, pb.pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_output_embeddings().weight.shape[0]
    torch.manual_seed(0)
    logits, targets = answer_logits(model, batch)
    full = sft_loss(logits, targets, 0.1)
    want = torch.autograd.grad(full, params)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.shape), t)[1], lambda t: t):
        torch.manual_seed(0)  # (LoRA dropout draws the same masks)
        chunked = answer_loss(model, batch, 0.1, chunk_tokens=8)
    got = torch.autograd.grad(chunked, params)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    rows = batch.answer_len * len(SIZES)
    assert rows > 8
    assert not any(len(s) and s[-1] == vocab and s.numel() // vocab > 8 for s in saved)  # at most a chunk of logits kept
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t.shape), t)[1], lambda t: t):
        sft_loss(*answer_logits(model, batch), 0.1)
    assert any(len(s) and s[-1] == vocab and s.numel() // vocab >= rows for s in kept)  # (the full path keeps them)
