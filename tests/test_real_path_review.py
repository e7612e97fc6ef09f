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


@pytest.mark.parametrize("strategy", ["lora", "partial"])
def test_checkpointing_keeps_frozen_parts_out_of_backward(tiny_model_cfg, small_data, strategy):
    """`enable_input_require_grads` (only needed for reentrant checkpointing) hooked the vision
    patch embedding, so every checkpointed run back-propagated through the frozen vision tower
    (and, for partial, the frozen lower layers). Their outputs must carry no grad."""
    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.strategies import apply_strategy
    from ecomcap.training.collate import PromptBuilder, with_answers
    from ecomcap.training.data import ShardImages

    model, processor = load_base(tiny_model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy=strategy, lora_r=2, partial_layers=(1, 1),
                                                    gradient_checkpointing=True))
    model.train()
    assert model.is_gradient_checkpointing
    seen = {}
    modules = dict(model.named_modules())
    visual = next(n for n in modules if n.endswith("visual"))
    layer0 = next(n for n in modules if n.endswith("language_model.layers.0"))
    for name in (visual, layer0):
        def hook(mod, args, out, name=name):
            if not torch.is_tensor(out):
                out = out[0] if isinstance(out, tuple) else next(v for v in out.values() if torch.is_tensor(v))
            seen[name] = out.requires_grad
        modules[name].register_forward_hook(hook)
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    data = ShardImages(small_data["train"])
    batch = with_answers(pb.prompts([data.image(0), data.image(1)]), [[11, 12, pb.eos_id], [13, pb.eos_id]],
                         pb.pad_id)
    out = model(**batch.inputs, use_cache=False)
    out.logits.float().mean().backward()
    assert seen == {visual: False, layer0: strategy == "lora"}  # LoRA trains layer 0; partial does not
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
