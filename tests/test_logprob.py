"""SCST's GPU-sized log-prob pass (images encoded once, chunked backward) gives the loss and
gradients of the plain one-forward pass (pixels repeated K times), and gradient checkpointing
(with LoRA on frozen embeddings) gives the same gradients."""
import numpy as np
import pytest
import torch

from ecomcap.config import FinetuneConfig
from ecomcap.modeling.load import load_base
from ecomcap.modeling.processor import suppressed_token_ids
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.collate import PromptBuilder, answer_logits, with_answers
from ecomcap.training.data import ShardImages
from ecomcap.training.logprob import PolicyLogprob
from ecomcap.training.losses import kl_penalty, scst_loss, sequence_logprob, token_logprobs
from ecomcap.training.scst import repeat_prompts

K = 3


def _setup(cfg, data_dir, lora_vision, checkpointing=False):
    model, processor = load_base(cfg)
    ft = FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.0, lora_vision=lora_vision,
                        gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model, _ = apply_strategy(model, ft)
    with torch.no_grad():  # non-zero B so adapter-on and adapter-off differ (KL > 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    pb = PromptBuilder(processor, cfg.prompt)
    data = ShardImages(data_dir)
    enc = pb.prompts([data.image(i) for i in range(2)])
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 7, 3, 6, 2]  # ragged samples, EOS-terminated
    seqs = [torch.randint(10, 200, (n - 1,), generator=g).tolist() + [pb.eos_id] for n in lengths]
    adv = torch.tensor([0.5, -1.0, 0.25, 1.5, -0.5, 0.0])
    return model, pb, enc, seqs, adv, suppressed_token_ids(processor)


def _reference(model, pb, enc, seqs, adv, suppress, kl_weight):
    """The original formulation: one forward over all K x B rows, pixels repeated per sample."""
    batch = with_answers(repeat_prompts(enc, K), seqs, pb.pad_id)
    logits, targets = answer_logits(model, batch, suppress)
    lp, mask = token_logprobs(logits, targets)
    loss = scst_loss(sequence_logprob(lp, mask, False), adv)
    if kl_weight:
        with torch.no_grad(), model.disable_adapter():
            ref_logits, _ = answer_logits(model, batch, suppress)
        loss = loss + kl_weight * kl_penalty(lp, token_logprobs(ref_logits, targets)[0], mask)
    loss.backward()
    return float(loss)


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("lora_vision", [False, True])
def test_chunked_equals_unchunked(tiny_model_cfg, small_data, lora_vision):
    model, pb, enc, seqs, adv, suppress = _setup(tiny_model_cfg, small_data["train"], lora_vision)
    want = _reference(model, pb, enc, seqs, adv, suppress, kl_weight=0.2)
    want_g = _grads(model)
    assert any(".visual." in n for n in want_g) == lora_vision and want_g
    for chunk in (0, 4, 1):  # all at once, chunks crossing an image boundary, one row at a time
        policy = PolicyLogprob(model=model, inner=model, pad_id=pb.pad_id, suppress=suppress,
                               kl_weight=0.2, chunk=chunk)
        got, logs = policy(enc, seqs, K, adv)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
        assert logs["kl"] > 0 and logs["sample_len"] == np.mean([len(s) for s in seqs])
        got_g = _grads(model)
        assert got_g.keys() == want_g.keys()
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("lora_vision", [False, True])
def test_deferred_backward_is_chunked_too(tiny_model_cfg, small_data, lora_vision):
    """DeepSpeed / DDP with a training tower: `logprob_chunk` was ignored (all K x B rows in one
    forward). Now every chunk but the last is backwarded as a micro-step and the last returned
    with its graph (carrying the earlier chunks' feature gradients into the tower)."""
    model, pb, enc, seqs, adv, suppress = _setup(tiny_model_cfg, small_data["train"], lora_vision)
    want = _reference(model, pb, enc, seqs, adv, suppress, kl_weight=0.2)
    want_g = _grads(model)
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    partial = []
    policy = PolicyLogprob(model=model, inner=model, pad_id=pb.pad_id, suppress=suppress, backward=None, chunk=2,
                           kl_weight=0.2, partial_backward=lambda loss: (partial.append(1), loss.backward()))
    loss, logs = policy(enc, seqs, K, adv)
    hook.remove()
    assert loss.requires_grad and len(partial) == 2  # 6 rows, chunks of 2: two micro-steps + the last
    assert max(rows) <= 2  # no forward (policy or KL reference) over all rows at once
    loss.backward()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    got_g = _grads(model)
    assert got_g.keys() == want_g.keys() and any(".visual." in n for n in got_g) == lora_vision
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6, msg=n)
def test_gradient_checkpointing_keeps_lora_gradients(tiny_model_cfg, small_data):
    """With frozen embeddings the checkpointed blocks' inputs carry no grad; non-reentrant
    checkpointing must still give vision and language LoRA their gradients."""
    grads = []
    for checkpointing in (False, True):
        model, pb, enc, seqs, adv, suppress = _setup(tiny_model_cfg, small_data["train"], True, checkpointing)
        assert model.is_gradient_checkpointing == checkpointing
        _reference(model, pb, enc, seqs, adv, suppress, kl_weight=0.0)
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and any(".visual." in n for n in grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
