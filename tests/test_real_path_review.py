"""Defects found in review of the real-model path (issue 10), one test each."""
import pytest
import torch

from ecomcap.errors import EcomcapError
from ecomcap.training.loop import resolve_precision


def _model(dtype):
    m = torch.nn.Linear(2, 2).to(dtype)
    m.weight.requires_grad_(False)
    m.bias.data = m.bias.data.float()  # a trainable kept in fp32
    return m


def test_fp16_weights_train_with_fp16_autocast():
    """A GPU without bf16 (T4, V100) or `dtype: float16` loads fp16 weights: 'auto' must pick
    fp16 (accelerate adds the GradScaler), not 'no' followed by a refusal."""
    assert resolve_precision("auto", _model(torch.float16), bf16_ok=False) == "fp16"
    assert resolve_precision("auto", _model(torch.float16), bf16_ok=True) == "fp16"
    assert resolve_precision("auto", _model(torch.bfloat16), bf16_ok=False) == "bf16"
    assert resolve_precision("auto", _model(torch.float32), bf16_ok=False) == "no"
    assert resolve_precision("auto", _model(torch.float32), bf16_ok=True) == "bf16"
    with pytest.raises(EcomcapError, match="set mixed_precision to fp16 or auto"):
        resolve_precision("no", _model(torch.float16), bf16_ok=False)
