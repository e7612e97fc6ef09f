"""Contrastive losses, gradient caching (== one-shot loss and gradients) and hard-negative mining."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecomcap.retrieval.config import TinyEncoderConfig
from ecomcap.retrieval.model.dual import load_dual_encoder
from ecomcap.retrieval.model.tiny import build_tiny_encoder
from ecomcap.retrieval.train.gradcache import grad_cache_backward
from ecomcap.retrieval.train.losses import info_nce, sigmoid_loss
from ecomcap.retrieval.train.mining import mine_hard_negatives

SMALL = TinyEncoderConfig(hidden=32, layers=1, heads=2, projection_dim=16, image_size=32, patch_size=16)


def test_info_nce_equals_cross_entropy_reference_and_masks_other_positives():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    pos = torch.zeros(4, 6, dtype=torch.bool)
    pos[range(4), range(4)] = True
    t = torch.tensor(math.log(10.0))
    loss, _ = info_nce(q, d, pos, t)
    logits = 10.0 * q @ d.T
    ref = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits[:, :4].T, torch.arange(4))) / 2
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    # column 1 is also a positive of query 0: it must not act as a negative for query 0
    pos[0, 1] = True
    masked, _ = info_nce(q, d, pos, t)
    row0 = logits[0].clone()
    row0[1] = float("-inf")
    expect_q0 = F.cross_entropy(row0[None], torch.tensor([0]))
    full_q0 = F.cross_entropy(logits[0][None], torch.tensor([0]))
    assert float(masked) != pytest.approx(float(loss))
    assert float(expect_q0) < float(full_q0)


def test_sigmoid_loss_matches_siglip_formula():
    torch.manual_seed(1)
    q, d = F.normalize(torch.randn(3, 5), dim=-1), F.normalize(torch.randn(3, 5), dim=-1)
    pos = torch.eye(3, dtype=torch.bool)
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    loss, _ = sigmoid_loss(q, d, pos, t, b)
    z = 10.0 * q @ d.T - 10.0
    labels = 2 * torch.eye(3) - 1
    ref = -sum(math.log(1 / (1 + math.exp(-float(labels[i, j] * z[i, j])))) for i in range(3) for j in range(3)) / 3
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def _towers(dual, n=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 20, (n, 7), generator=g)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pixels = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}
    return [(dual.embed_text, text), (lambda inp: dual.embed_image(inp["pixel_values"]), pixels)]


def _loss_fn(dual, pos):
    def fn(q, d):
        t, _ = dual.scale_bias()
        return info_nce(q, d, pos, t)
    return fn


def _grads(dual):
    return {n: p.grad.clone() for n, p in dual.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["chinese_clip", "siglip"])
def test_grad_cache_equals_one_shot_loss_and_gradients(tmp_path, arch):
    dual = load_dual_encoder(build_tiny_encoder(tmp_path / arch, arch, ["红色 T恤"], SMALL)).eval()
    towers = _towers(dual)
    pos = torch.eye(6, dtype=torch.bool)
    loss_fn = _loss_fn(dual, pos)
    one_shot, _ = loss_fn(*(fn(inp) for fn, inp in towers))
    one_shot.backward()
    ref = _grads(dual)
    dual.zero_grad(set_to_none=True)
    cached, _ = grad_cache_backward(towers, loss_fn, chunk=2)
    got = _grads(dual)
    assert float(cached) == pytest.approx(float(one_shot), rel=1e-6)
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: dropout there draws from the device RNG"))])
def test_grad_cache_replays_dropout_masks(tmp_path, device):
    """In train mode (dropout on) each chunk's re-forward reuses its RNG state (CPU and device):
    the gradients equal back-propagation through the very embeddings the loss saw."""
    dual = load_dual_encoder(build_tiny_encoder(tmp_path / "cc", "chinese_clip", ["红色 T恤"], SMALL)).train()
    dual = dual.to(device)
    towers = [(fn, {k: v.to(device) for k, v in inp.items()}) for fn, inp in _towers(dual)]
    pos = torch.eye(6, dtype=torch.bool, device=device)
    loss_fn = _loss_fn(dual, pos)
    torch.manual_seed(3)
    embs = [torch.cat([fn({k: v[i:i + 3] for k, v in inp.items()}) for i in (0, 3)]) for fn, inp in towers]
    ref_loss, _ = loss_fn(*embs)
    ref_loss.backward()
    ref = _grads(dual)
    dual.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss, _ = grad_cache_backward(towers, loss_fn, chunk=3)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for name, g in _grads(dual).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mining_samples_from_the_rank_window_without_positives_or_their_products():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(300, 8)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:3] + 0.01  # query i is closest to item i
    groups = [f"g{j // 2}" for j in range(300)]  # items 2k and 2k+1 are one product
    positives = [[0], [2, 5], [4]]
    negs = mine_hard_negatives(queries, items, positives, groups, window=(10, 210), per_query=15, seed=0)
    order = np.argsort(-(queries @ items.T), axis=1)
    for qi, chosen in enumerate(negs):
        assert len(chosen) == 15 and len(set(chosen)) == 15
        rank = {int(j): r for r, j in enumerate(order[qi])}
        assert all(10 <= rank[j] < 210 for j in chosen)
        banned = {groups[p] for p in positives[qi]}
        assert not set(chosen) & set(positives[qi]) and all(groups[j] not in banned for j in chosen)
    assert negs == mine_hard_negatives(queries, items, positives, groups, seed=0)  # deterministic
