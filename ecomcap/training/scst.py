"""Self-critical sequence training: sample K captions per image, reward = CIDEr-D (training-set
document frequencies), baseline = mean of the other samples (or the greedy caption), and raise
the log-likelihood of samples that beat their baseline.

Starts from the SFT output (merged into the base when it is an adapter) and trains a fresh
LoRA by default, so the KL reference (the SFT policy) is the same model with the adapter off.
Sampling suppresses the special/vision tokens and the log-prob pass masks the same set.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ecomcap.config import GenerateConfig, GroundingConfig, ModelConfig, SCSTConfig
from ecomcap.data.clean import repeated_ngram_share
from ecomcap.data.shards import read_references
from ecomcap.errors import EcomcapError
from ecomcap.text import tokenize_many
from ecomcap.training.budget import check_token_budget, model_token_limit
from ecomcap.training.collate import (  # noqa: F401  (repeat_prompts, split_samples: re-exported)
    PromptBuilder,
    answer_logits,
    repeat_prompts,
    split_samples,
    with_answers,
)
from ecomcap.training.data import Example
from ecomcap.training.logprob import policy_logprob
from ecomcap.training.loop import MetricsCallback, StageResult, TrainLoop
from ecomcap.training.losses import sft_loss
from ecomcap.training.rewards import CombinedReward, greedy_baseline, mean_of_others
from ecomcap.training.sampling import Sampler
from ecomcap.training.tuning import start_tuning

log = logging.getLogger(__name__)


class SCSTStep:
    """One SCST optimisation step's computation (sampling, reward, losses)."""

    def __init__(self, loop: TrainLoop, cfg: SCSTConfig, reward: CombinedReward, gen_cfg: GenerateConfig):
        self.loop, self.cfg, self.reward = loop, cfg, reward
        self.builder: PromptBuilder = loop.builder
        self.sampler = Sampler(loop, cfg, gen_cfg)
        self.policy = policy_logprob(loop, cfg, self.sampler.suppress)
        self.does_backward = self.policy.backward is not None  # the loop then skips its backward

    def __call__(self, examples: list[Example]):
        cfg, k, dev = self.cfg, self.cfg.samples, self.loop.acc.device
        enc = {key: v.to(dev) for key, v in self.builder.prompts([e.image for e in examples]).items()}
        seqs, ended = self.sampler.sample(enc, k)
        ids = [e.image_id for e in examples for _ in range(k)]
        captions = self.sampler.decode(seqs)
        images = [e.image for e in examples]
        t0 = time.perf_counter()
        scores, terms = self.reward(captions, ended, ids, images, np.arange(len(captions)) // k)
        reward_s = time.perf_counter() - t0
        if cfg.baseline == "greedy":  # the same combined reward for the greedy caption
            g, g_end = self.sampler.greedy(enc)
            g_scores, _ = self.reward(self.sampler.decode(g), g_end, [e.image_id for e in examples], images)
            base = greedy_baseline(g_scores, k)
        else:
            base = mean_of_others(scores, k)
        adv = torch.as_tensor(scores - base, dtype=torch.float32, device=dev)
        # policy gradient (+ KL): images encoded once, sequences scored and backwarded in chunks
        loss, pg_logs = self.policy(enc, seqs, k, adv)
        logs = {"reward": float(scores.mean()), "baseline": float(base.mean()),
                "advantage_std": float(np.std(scores - base)),
                "repeat_ngram": float(np.mean([repeated_ngram_share(t, 3) for t in tokenize_many(captions)])),
                "reward_s": reward_s, **{f"reward_{n}": float(v.mean()) for n, v in terms.items()},
                **pg_logs}
        if cfg.xe_weight > 0:
            xe = self._xe(examples, enc, dev)
            loss = loss + cfg.xe_weight * xe
            logs["xe_loss"] = float(xe.detach())
        return loss, logs

    def _xe(self, examples: list[Example], enc, dev) -> torch.Tensor:
        answers = self.builder.answer_ids([e.answer for e in examples], self.cfg.max_answer_tokens)
        batch = with_answers(enc, answers, self.builder.pad_id).to(dev)
        logits, targets = answer_logits(self.loop.model, batch)
        return sft_loss(logits, targets)


def run_scst(
    sft_model_dir: str | Path,
    train_dir: str | Path,
    valid_dir: str | Path | None,
    model_cfg: ModelConfig,
    cfg: SCSTConfig,
    gen_cfg: GenerateConfig | None = None,
    on_metrics: MetricsCallback | None = None,
    dev_images: int = 0,
    scorer_dir: str | Path | None = None,
    grounding: GroundingConfig | None = None,
) -> StageResult:
    """SCST from an SFT output directory; returns the exported (best) model (`dev_images`: as
    in `run_sft`, the same held-out training images pick the best checkpoint; `scorer_dir`: the
    grounding scorer of the CLIP-S / distinctiveness reward terms)."""
    if cfg.kl_weight > 0 and cfg.finetune.strategy not in ("lora", "qlora"):
        raise EcomcapError("scst.kl_weight needs a LoRA strategy (the reference is the model with the adapter off)")
    gen_cfg = gen_cfg or GenerateConfig()
    loop, train, scorer, cfg, gen_cfg = start_tuning(
        "scst", TrainLoop, sft_model_dir, train_dir, valid_dir, model_cfg, cfg, gen_cfg, on_metrics, dev_images,
        scorer_dir, grounding or GroundingConfig(), start_key="sft_model")
    reward = CombinedReward(read_references(train_dir), cfg.reward, scorer)
    answer = max(cfg.max_new_tokens, cfg.max_answer_tokens if cfg.xe_weight > 0 else 0)
    check_token_budget(train, loop.builder, answer, model_token_limit(loop.acc.unwrap_model(loop.model), model_cfg.max_seq_len))
    return loop.run(train, SCSTStep(loop, cfg, reward, gen_cfg))
