"""The prefill-once beam search loop (`ecomcap.inference.beam`) gives stock `generate`'s token ids:
mixed image sizes (left padding, per-row mRoPE deltas), beams that finish at EOS at different
steps, length penalties, early-stopping modes, several returned sequences; and anything it does
not implement goes to `generate`."""
import pytest
import torch

from ecomcap.config import GenerateConfig
from ecomcap.inference import beam
from ecomcap.inference.decode import generate
from ecomcap.inference.generate import generate_kwargs
from ecomcap.inference.prefill import generative_model
from tests.test_prefill import SIZES, _images, _model


def _lengths(out, prompt_len: int, eos: list[int]) -> list[int]:
    """Generated length per row: up to its first EOS, or -1 for a row that ran to the length limit."""
    return [next((i + 1 for i, t in enumerate(r) if t in eos), -1) for r in out[:, prompt_len:].tolist()]


def _varied(lengths: list[int]) -> bool:
    """Some rows ended at EOS, and not all at the same step."""
    return any(n > 0 for n in lengths) and len(set(lengths)) > 1


def _eos_ending_beams_at_different_steps(model, enc, kw, stop_early: bool) -> list[int]:
    """Tokens used as EOS such that stock beam search ends rows at them at different steps (or
    some at EOS, others at the length limit): the finished-hypothesis bookkeeping is exercised.
    `stop_early`: the whole batch is done before the length limit (early stopping decides) - the
    model's most frequent tokens are added as EOS ids until it is."""
    out = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
    ids, counts = out.flatten().unique(return_counts=True)
    frequent = ids[counts.argsort(descending=True)].tolist()
    candidates = [frequent[:m] for m in range(1, len(frequent))] if stop_early else [[t] for t in frequent]
    for eos in candidates:
        res, steps = _counting_forwards(model, model.generate, **enc, **{**kw, "eos_token_id": eos})
        if _varied(_lengths(res, enc["input_ids"].shape[1], eos)) and (steps < kw["max_new_tokens"] or not stop_early):
            return eos
    raise AssertionError("no EOS ids end the beams at different steps")


def _counting_forwards(model, fn, *args, **kw):
    """fn's result and how many forward passes the model ran during it."""
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return fn(*args, **kw), len(calls)
    finally:
        hook.remove()


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = beam.beam_search

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(beam, "beam_search", spy)


@pytest.fixture(scope="module")
def perturbed(tiny_model_cfg):
    model, pb = _model(tiny_model_cfg)
    return model, pb, pb.prompts(_images())


@pytest.mark.parametrize("extra,stop_early", [
    (dict(num_beams=3, length_penalty=1.0), False),
    (dict(num_beams=3, length_penalty=1.0), True),
    (dict(num_beams=4, length_penalty=0.6, num_return_sequences=2), False),
    (dict(num_beams=4, length_penalty=0.6, num_return_sequences=2), True),
    (dict(num_beams=5, length_penalty=1.3, early_stopping=False), False),
    (dict(num_beams=4, length_penalty=3.0, early_stopping=False), False),
    (dict(num_beams=3, length_penalty=-1.0, early_stopping=False), True),
    (dict(num_beams=3, length_penalty=1.2, early_stopping="never"), False),
    (dict(num_beams=3, length_penalty=-1.0, early_stopping="never"), True),
])
def test_loop_equals_stock_generate_with_beams_ending_at_eos(perturbed, monkeypatch, extra, stop_early):
    model, pb, enc = perturbed
    kw = {**generate_kwargs(GenerateConfig(num_beams=extra["num_beams"], max_new_tokens=16), pb), **extra}
    kw["eos_token_id"] = eos = _eos_ending_beams_at_different_steps(model, enc, kw, stop_early)
    spy = _Spy(monkeypatch)
    (stock, stock_steps), (once, once_steps) = (_counting_forwards(model, generate, model, enc, m, **kw)
                                                for m in ("hf", "once"))
    assert spy.calls == 1  # the loop ran (not a fallback to `generate`)
    assert torch.equal(stock, once)
    assert once_steps == stock_steps  # stops at the same step (early-stopping heuristic, all beams done)
    assert (stock_steps < kw["max_new_tokens"]) == stop_early
    assert _varied(_lengths(stock, enc["input_ids"].shape[1], eos))
    assert stock.shape[0] == len(SIZES) * kw.get("num_return_sequences", 1)


@pytest.fixture(scope="module")
def text_lm():
    """A small Qwen2 text model (the real class) whose near-flat random distributions over 12
    tokens end beams at EOS early and at many different steps; two left-padded rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    ids = torch.randint(3, 12, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :4] = 0
    return model, {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_loop_equals_stock_generate_over_a_sweep_of_eos_ids_and_stopping_rules(text_lm, monkeypatch):
    """Token ids and the number of forward passes (where the batch stops) equal the stock path's
    for every combination of EOS sets (1-3 ids), length penalties and early-stopping modes."""
    model, enc = text_lm
    spy, stopped_early = _Spy(monkeypatch), 0
    for eos in ([5], [5, 9], [5, 9, 11]):
        for length_penalty in (-1.0, 0.5, 1.0, 2.5):
            for early_stopping in (True, False, "never"):
                kw = dict(num_beams=3, max_new_tokens=20, eos_token_id=eos, pad_token_id=0, do_sample=False,
                          length_penalty=length_penalty, early_stopping=early_stopping)
                stock, stock_steps = _counting_forwards(model, generate, model, enc, "hf", **kw)
                once, once_steps = _counting_forwards(model, generate, model, enc, "once", **kw)
                assert torch.equal(stock, once), kw
                assert stock_steps == once_steps, kw
                stopped_early += stock_steps < kw["max_new_tokens"]
    assert spy.calls == 36 and stopped_early >= 20  # the loop ran every time; the stopping rules decided


def test_loop_equals_stock_generate_without_padding_and_real_eos(perturbed, monkeypatch):
    model, pb, _ = perturbed
    enc = pb.prompts(_images([(150, 100)] * 3))
    kw = generate_kwargs(GenerateConfig(num_beams=4, max_new_tokens=9, length_penalty=0.8), pb)
    spy = _Spy(monkeypatch)
    assert torch.equal(generate(model, enc, "hf", **kw), generate(model, enc, "once", **kw))
    assert spy.calls == 1


@pytest.mark.parametrize("extra", [
    dict(return_dict_in_generate=True), dict(do_sample=True, top_k=5, num_return_sequences=3),
])
def test_what_the_loop_does_not_implement_goes_to_generate(perturbed, monkeypatch, extra):
    model, pb, enc = perturbed
    kw = {**generate_kwargs(GenerateConfig(num_beams=3, max_new_tokens=6), pb), **extra}
    spy = _Spy(monkeypatch)
    torch.manual_seed(3)
    stock = generate(model, enc, "hf", **kw)
    torch.manual_seed(3)
    once = generate(model, enc, "once", **kw)
    assert spy.calls == 0
    assert torch.equal(getattr(stock, "sequences", stock), getattr(once, "sequences", once))


def test_a_checkpoint_generation_config_with_processors_goes_to_generate(perturbed, monkeypatch):
    """A checkpoint whose generation_config adds a processor (here min_new_tokens) keeps `generate`,
    which applies it; the loop would not."""
    model, pb, enc = perturbed
    kw = generate_kwargs(GenerateConfig(num_beams=3, max_new_tokens=6), pb)
    gc = generative_model(model).generation_config
    assert beam.plan(generative_model(model), kw) is not None
    monkeypatch.setattr(gc, "min_new_tokens", 4)
    assert beam.plan(generative_model(model), kw) is None


def test_fields_the_call_leaves_out_come_from_the_checkpoint_generation_config(perturbed, monkeypatch):
    """Like `generate`: Qwen Instruct's generation_config says repetition_penalty 1.05, so a call
    that does not set it runs the loop with that penalty (under `generate`'s rule when the call
    names none); a length penalty and EOS ids from the generation_config are the loop's too.
    Token ids equal the stock path's."""
    model, pb, enc = perturbed
    gm = generative_model(model)
    bare = dict(num_beams=3, max_new_tokens=10, pad_token_id=pb.pad_id)
    monkeypatch.setattr(gm.generation_config, "repetition_penalty", 1.05)
    assert beam.plan(gm, bare)["repetition_penalty"] == 1.05
    spy = _Spy(monkeypatch)
    assert torch.equal(generate(model, enc, "hf", **bare), generate(model, enc, "once", **bare))
    assert spy.calls == 1
    monkeypatch.setattr(gm.generation_config, "repetition_penalty", 1.0)
    monkeypatch.setattr(gm.generation_config, "length_penalty", 2.5)
    monkeypatch.setattr(gm.generation_config, "eos_token_id", [pb.eos_id, 8])
    settings = beam.plan(gm, bare)
    assert settings["length_penalty"] == 2.5 and settings["eos_token_id"] == [pb.eos_id, 8]
    assert torch.equal(generate(model, enc, "hf", **bare), generate(model, enc, "once", **bare))


@pytest.mark.parametrize("field,value,runs_loop", [
    ("return_dict_in_generate", True, False), ("output_scores", True, False), ("low_memory", True, False),
    ("use_cache", False, False), ("min_new_tokens", 3, False),
    ("min_length", 0, True), ("num_beam_groups", 1, True), ("min_p", 0.05, True), ("typical_p", 0.9, True),
])
def test_what_a_checkpoint_generation_config_says_decides_the_path(perturbed, monkeypatch, field, value, runs_loop):
    """Output settings (generate would return scores / refuse low_memory) and real processors keep
    `generate`; neutral values and sampling-only fields (no effect on beam search) keep the loop."""
    model, pb, _ = perturbed
    gm = generative_model(model)
    monkeypatch.setattr(gm.generation_config, field, value)
    kw = generate_kwargs(GenerateConfig(num_beams=3, max_new_tokens=6), pb)
    assert (beam.plan(gm, kw) is not None) == runs_loop


@pytest.mark.parametrize("extra", [dict(num_beams=3), dict(num_beams=1),
                                   dict(num_beams=1, do_sample=True, num_return_sequences=3)])
def test_every_decode_path_runs_the_matmul_patch_embedding(perturbed, extra):
    """`load_base` installs it for the model's lifetime: beam search, greedy decoding (validation)
    and sampling (SCST) run the same numerics as training."""
    model, pb, enc = perturbed
    pe = generative_model(model).model.visual.patch_embed
    seen = []
    hook = generative_model(model).model.visual.register_forward_pre_hook(
        lambda *_: seen.append("forward" in vars(pe)))
    try:
        torch.manual_seed(0)
        generate(model, enc, "once", **{**generate_kwargs(GenerateConfig(max_new_tokens=4), pb), **extra})
    finally:
        hook.remove()
    assert seen == [True]


def test_loop_runs_under_a_lora_wrapper(tiny_model_cfg, monkeypatch):
    """The SCST/validation policy is a PEFT model: the loop reaches the base model through it."""
    model, pb = _model(tiny_model_cfg, lora=True)
    enc = pb.prompts(_images())
    kw = generate_kwargs(GenerateConfig(num_beams=3, max_new_tokens=8), pb)
    spy = _Spy(monkeypatch)
    assert torch.equal(generate(model, enc, "hf", **kw), generate(model, enc, "once", **kw))
    assert spy.calls == 1
