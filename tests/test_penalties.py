"""Repetition penalty and n-gram blocking (`ecomcap.inference.penalties`): HF's processors' numbers
under the prompt rule; the own beam loop with the penalties gives `generate`'s token ids; the
generated rule leaves the prompt's words free; the shipped configs take the fast loop."""
from pathlib import Path

import pytest
import torch
import yaml

from ecomcap.config import GenerateConfig
from ecomcap.inference import beam
from ecomcap.inference.decode import generate
from ecomcap.inference.generate import generate_kwargs
from ecomcap.inference.penalties import GeneratedTokenPenalties, apply_penalties, left_padding
from ecomcap.inference.prefill import generative_model
from tests.test_beam import _counting_forwards, _Spy, perturbed, text_lm  # noqa: F401  (fixtures)
from tests.test_prefill import SIZES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rep,ngram", [(1.3, 3), (0.8, 2), (1.0, 1), (2.0, 0)])
def test_apply_penalties_equals_hf_processors_under_the_prompt_rule(rep, ngram):
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (6, 14), generator=g)  # a small vocabulary: n-grams repeat
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[4, :6] = 0
    scores = torch.randn(6, 50, generator=g)
    want = scores.clone()
    if rep != 1.0:
        want = RepetitionPenaltyLogitsProcessor(rep, prompt_ignore_length=(mask != 0).int().argmax(1))(ids, want)
    if ngram:
        want = NoRepeatNGramLogitsProcessor(ngram)(ids, want)
    got = apply_penalties(scores.clone(), ids, rep, ngram, left_padding(mask, ids.shape))
    assert torch.equal(got, want)
    assert not torch.equal(got, scores)  # (something was penalised)


def test_the_generated_rule_leaves_the_prompt_words_free():
    prompt = torch.tensor([[5, 6, 5, 6]])
    scores = torch.full((1, 10), -2.0)
    proc = GeneratedTokenPenalties(1.5, 2)
    assert torch.equal(proc(prompt, scores.clone()), scores)  # first call: the prompt alone, nothing said yet
    out = proc(torch.tensor([[5, 6, 5, 6, 7, 8, 7]]), scores.clone())  # the caption so far: 7 8 7
    assert out[0, 8] == -float("inf")  # "7 8" was said: 8 may not follow 7 again
    assert out[0, 7] == -3.0  # said: penalised
    assert out[0, 5] == out[0, 6] == -2.0  # the prompt's words are free
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[5, 6, 5, 6, 7, 8, 7]]), scores.clone())
    assert hf[0, 5] == -3.0  # (HF's rule counts them)


@pytest.mark.parametrize("scope", ["prompt", "generated"])
@pytest.mark.parametrize("rep,ngram", [(1.2, 3), (1.5, 0), (1.0, 2), (0.7, 2)])
def test_loop_with_penalties_equals_generate(perturbed, monkeypatch, scope, rep, ngram):  # noqa: F811
    """Mixed image sizes (left padding) with the real VL model; `hf` is `generate`'s own beam search
    (its processors under the prompt rule, `GeneratedTokenPenalties` under the generated one)."""
    model, pb, enc = perturbed
    kw = generate_kwargs(GenerateConfig(num_beams=4, max_new_tokens=14, length_penalty=0.8, repetition_penalty=rep,
                                        no_repeat_ngram_size=ngram), pb)
    spy = _Spy(monkeypatch)
    stock, once = generate(model, enc, "hf", scope, **kw), generate(model, enc, "once", scope, **kw)
    assert spy.calls == 1
    assert torch.equal(stock, once)
    assert stock.shape[0] == len(SIZES)
    plain = generate(model, enc, "hf", scope, **{**kw, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0})
    assert not torch.equal(plain, stock)  # the penalties changed the captions


def test_loop_with_penalties_equals_generate_over_short_text_rows(text_lm, monkeypatch):  # noqa: F811
    """12 tokens, left padding, EOS hit at many steps: n-gram bans and penalties bite at every step."""
    model, enc = text_lm
    spy = _Spy(monkeypatch)
    for scope in ("prompt", "generated"):
        for rep, ngram in ((1.3, 2), (1.0, 3), (1.8, 1), (0.9, 0)):
            kw = dict(num_beams=3, max_new_tokens=12, eos_token_id=[5], pad_token_id=0, do_sample=False,
                      length_penalty=1.0, early_stopping=True, repetition_penalty=rep, no_repeat_ngram_size=ngram)
            stock, steps = _counting_forwards(model, generate, model, enc, "hf", penalty_scope=scope, **kw)
            once, once_steps = _counting_forwards(model, generate, model, enc, "once", penalty_scope=scope, **kw)
            assert torch.equal(stock, once), (scope, kw)
            assert steps == once_steps
    assert spy.calls == 8


def test_greedy_and_sampling_take_the_same_rule(perturbed):  # noqa: F811
    """Greedy decoding stays on `generate` with the generated rule as a processor: its ids equal a
    step-by-step greedy loop that applies the rule itself."""
    model, pb, enc = perturbed
    kw = generate_kwargs(GenerateConfig(num_beams=1, max_new_tokens=8, repetition_penalty=1.4,
                                        no_repeat_ngram_size=2), pb)
    out = generate(model, enc, "once", "generated", **kw)[:, enc["input_ids"].shape[1]:]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for t in range(out.shape[1]):  # teacher-forced on the generated prefix: the next token is the rule's argmax
            full = torch.cat([ids, out[:, :t]], 1)
            more = {"mm_token_type_ids": torch.cat([extra["mm_token_type_ids"], full.new_zeros(len(full), t)], 1)}
            logits = model(input_ids=full, attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], t)], 1),
                           **{**extra, **more}).logits[:, -1].float()
            logits[:, kw["suppress_tokens"]] = -float("inf")
            logits = apply_penalties(logits, out[:, :t], 1.4, 2)
            done = (out[:, :t] == pb.eos_id).any(1) if t else torch.zeros(len(out), dtype=torch.bool)
            assert torch.equal(logits.argmax(-1)[~done], out[~done, t])


@pytest.mark.parametrize("config", ["qwen25vl_3b_lora.yaml", "qwen25vl_7b_qlora.yaml", "k8s.yaml"])
def test_shipped_gpu_configs_and_qwen_generation_config_take_the_loop(perturbed, monkeypatch, config):  # noqa: F811
    model, pb, _ = perturbed
    doc = yaml.safe_load((ROOT / "configs" / config).read_text())
    gen = GenerateConfig(**doc["parameters"]["config"]["generate"])
    assert gen.repetition_penalty > 1 and gen.no_repeat_ngram_size > 0 and gen.num_beams > 1
    gm = generative_model(model)
    monkeypatch.setattr(gm.generation_config, "repetition_penalty", 1.05)  # Qwen2.5-VL-Instruct's file
    settings = beam.plan(gm, generate_kwargs(gen, pb), gen.penalty_scope)
    assert settings is not None and settings["penalty_scope"] == "generated"
    assert settings["repetition_penalty"] == gen.repetition_penalty
