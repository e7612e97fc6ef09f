"""The patch embedding as one matmul: the convolution's output and gradients up to float rounding,
the conv really skipped inside the block, restored after it (also when blocks nest), installed for
the model's lifetime by `load_base` unless `model.patch_embed: conv`, and left alone where it
cannot apply (ZeRO-3 partitions, accelerate hooks, models without one)."""
import torch

from ecomcap.modeling.load import load_base
from ecomcap.modeling.patch_embed import _patch_embed, patch_embed_as_matmul, runs_matmul


def _counting_conv(proj):
    """Counts calls of the Conv3d (an instance-level wrapper, not a hook: hooks disable the swap)."""
    calls, real = [], proj.forward
    proj.forward = lambda x: (calls.append(1), real(x))[1]
    return calls


def _conv(cfg):
    return cfg.model_copy(update={"patch_embed": "conv"})


def test_matmul_equals_the_convolution_and_is_restored(tiny_model_cfg):
    model, _ = load_base(_conv(tiny_model_cfg))
    assert not runs_matmul(model)
    pe = _patch_embed(model)
    assert pe is not None
    torch.manual_seed(0)
    pixels = torch.randn(64, pe.proj.weight[0].numel())
    calls = _counting_conv(pe.proj)
    with torch.no_grad():
        want = pe(pixels)
        assert len(calls) == 1
        with patch_embed_as_matmul(model):
            got = pe(pixels)
            with patch_embed_as_matmul(model):  # nested (or a second thread): one swap, shared
                torch.testing.assert_close(pe(pixels), got)
            torch.testing.assert_close(pe(pixels), got)  # the inner block left the swap in place
        assert len(calls) == 1  # the Conv3d did not run inside the blocks
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        pe(pixels)
    assert len(calls) == 2 and "forward" not in vars(pe)  # the module's own forward is back


def test_left_alone_where_it_cannot_apply(tiny_model_cfg):
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, _ = load_base(_conv(tiny_model_cfg))
    pe = _patch_embed(model)
    add_hook_to_module(pe, ModelHook())  # device_map / offload hooks live in the module's forward
    hooked = pe.forward
    with patch_embed_as_matmul(model):
        assert pe.forward is hooked
    assert pe.forward is hooked  # still hooked after the block
    model, _ = load_base(_conv(tiny_model_cfg))
    _patch_embed(model).proj.weight.ds_id = 7  # a ZeRO-3 partitioned weight (gathered only by proj's own hook)
    assert _patch_embed(model) is None
    text_only = torch.nn.Linear(4, 4)
    with patch_embed_as_matmul(text_only):  # no vision tower: nothing to swap
        assert text_only(torch.ones(1, 4)).shape == (1, 4)


def test_load_installs_it_for_the_model_lifetime_with_the_convolution_gradients(tiny_model_cfg):
    """Training runs the matmul too: the filters' gradient equals the convolution's (float rounding)."""
    model, _ = load_base(tiny_model_cfg)
    assert runs_matmul(model) and "forward" in vars(_patch_embed(model))
    stock, _ = load_base(_conv(tiny_model_cfg))
    assert not runs_matmul(stock)
    torch.manual_seed(0)
    pixels = torch.randn(64, stock.model.visual.patch_embed.proj.weight[0].numel())
    grads = []
    for m in (model, stock):
        pe = m.model.visual.patch_embed
        pe.proj.weight.requires_grad_(True)
        (pe(pixels) ** 2).sum().backward()
        grads.append(pe.proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    with patch_embed_as_matmul(model):  # a block inside the lifetime swap leaves it installed
        pass
    assert runs_matmul(model)
