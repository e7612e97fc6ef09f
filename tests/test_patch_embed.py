"""The patch embedding as one matmul: the convolution's output up to float rounding, the conv
really skipped inside the block, restored after it, and left alone where it cannot apply."""
import torch

from ecomcap.inference.patch_embed import _patch_embed, patch_embed_as_matmul
from ecomcap.modeling.load import load_base


def _calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_matmul_equals_the_convolution_and_is_restored(tiny_model_cfg):
    model, _ = load_base(tiny_model_cfg)
    pe = _patch_embed(model)
    assert pe is not None
    torch.manual_seed(0)
    pixels = torch.randn(64, pe.proj.weight[0].numel())
    calls, hook = _calls(pe.proj)
    with torch.no_grad():
        want = pe(pixels)
        assert len(calls) == 1
        with patch_embed_as_matmul(model):
            got = pe(pixels)
        assert len(calls) == 1  # the Conv3d did not run inside the block
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        pe(pixels)
    hook.remove()
    assert len(calls) == 2 and "forward" not in vars(pe)  # the module's own forward is back


def test_left_alone_where_it_cannot_apply(tiny_model_cfg):
    model, _ = load_base(tiny_model_cfg)
    pe = _patch_embed(model)
    pe.proj.weight.ds_id = 7  # a ZeRO-3 partitioned weight (gathered only by proj's own hook)
    assert _patch_embed(model) is None
    text_only = torch.nn.Linear(4, 4)
    with patch_embed_as_matmul(text_only):  # no vision tower: nothing to swap
        assert text_only(torch.ones(1, 4)).shape == (1, 4)
