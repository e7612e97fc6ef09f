"""Sampling captions from the policy being trained (SCST's samples, DPO's candidate pairs).

One setup for both stages: the generation settings with sampling on and the output-side
repetition guards off (a loop must reach the reward, not be hidden from it), the special and
vision tokens suppressed, and under ZeRO-3 the parameters gathered once per pass (with
`gather_for_generation` off, `decode.generate` keeps the partitioned ranks in step).
"""
from __future__ import annotations

import torch

from ecomcap.config import GenerateConfig
from ecomcap.inference.decode import generate
from ecomcap.inference.generate import generate_kwargs
from ecomcap.modeling.processor import suppressed_token_ids
from ecomcap.training.collate import split_samples
from ecomcap.training.zero import gathered_for_generation


class Sampler:
    """Samples (or greedy-decodes) captions with the loop's model; `cfg` carries temperature,
    top_k, top_p and max_new_tokens (SCSTConfig, DPOConfig)."""

    def __init__(self, loop, cfg, gen_cfg: GenerateConfig):
        self.loop, self.builder = loop, loop.builder
        self.suppress = suppressed_token_ids(self.builder.processor)
        self.tok = self.builder.processor.tokenizer
        sample_cfg = gen_cfg.model_copy(update=dict(
            num_beams=1, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.0,
            no_repeat_ngram_size=0))
        self.sample_kw = generate_kwargs(sample_cfg, self.builder)
        # (`decode.generate` says synced_gpus: ranks in step while partitioned, alone once gathered)
        self.gather = loop.cfg.gather_for_generation
        self.greedy_kw = {**self.sample_kw, "do_sample": False}
        self.prefill = gen_cfg.prefill

    def decode(self, seqs: list[list[int]]) -> list[str]:
        """The captions as decoded, not post-processed: collapsing a looping phrase would hide
        the loop from the reward and from `repeat_ngram` (post-processing is for output)."""
        return self.tok.batch_decode(seqs, skip_special_tokens=True)

    @torch.no_grad()
    def _generate(self, enc, **kw) -> torch.Tensor:
        model = self.loop.acc.unwrap_model(self.loop.model)
        was_training = model.training
        model.eval()
        with gathered_for_generation(self.loop.acc, self.loop.model, self.gather):  # ZeRO-3: whole, once
            out = generate(model, enc, self.prefill, **kw)
        model.train(was_training)
        return out[:, enc["input_ids"].shape[1]:]

    def sample(self, enc, k: int) -> tuple[list[list[int]], list[bool]]:
        """K samples per prompt row, image-major: (token ids ending at EOS, whether each ended)."""
        return split_samples(self._generate(enc, num_return_sequences=k, **self.sample_kw),
                             self.builder.eos_id, self.builder.pad_id)

    def greedy(self, enc) -> tuple[list[list[int]], list[bool]]:
        return split_samples(self._generate(enc, **self.greedy_kw), self.builder.eos_id, self.builder.pad_id)
