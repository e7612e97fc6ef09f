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
from ecomcap.data.shards import read_references, read_report
from ecomcap.errors import EcomcapError
from ecomcap.modeling.load import expected_dtype, load_trained
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.text import tokenize_many
from ecomcap.training.budget import check_token_budget, model_token_limit
from ecomcap.training.collate import (  # noqa: F401  (repeat_prompts, split_samples: re-exported)
    PromptBuilder,
    answer_logits,
    repeat_prompts,
    split_samples,
    with_answers,
)
from ecomcap.training.data import Example, train_and_dev
from ecomcap.training.identity import model_fingerprint, run_identity
from ecomcap.training.logprob import policy_logprob
from ecomcap.training.loop import MetricsCallback, StageResult, TrainLoop, make_accelerator
from ecomcap.training.losses import sft_loss
from ecomcap.training.rewards import CombinedReward, greedy_baseline, mean_of_others
from ecomcap.training.sampling import Sampler
from ecomcap.training.zero import merge_adapter

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


def disable_dropout(model: torch.nn.Module) -> int:
    """One policy for sampling (eval mode), the log-prob pass (train mode) and the KL reference
    (adapter off): with LoRA dropout on only in the log-prob pass, the gradient would be taken
    for another policy than the one that sampled (TRL disables dropout for the same reason)."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
    return n


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
    torch.manual_seed(cfg.seed)  # adapter init and sampling follow the seed, not the process history
    gen_cfg = gen_cfg or GenerateConfig()
    acc = make_accelerator(cfg, dtype=expected_dtype(model_cfg))  # first: ZeRO-3 then loads sharded
    # 4-bit base for SCST QLoRA (whatever SFT used), as evaluation and export will load it
    model, processor = load_trained(sft_model_dir, model_cfg, quantized=cfg.finetune.strategy == "qlora")
    if hasattr(model, "merge_and_unload"):
        model = merge_adapter(model)  # (gathering each weight of a ZeRO-3 partitioned base)
    if cfg.kl_weight > 0 and cfg.finetune.strategy not in ("lora", "qlora"):
        raise EcomcapError("scst.kl_weight needs a LoRA strategy (the reference is the model with the adapter off)")
    model, _ = apply_strategy(model, cfg.finetune)
    disable_dropout(model)
    train, select_on = train_and_dev(train_dir, valid_dir, dev_images)
    scorer = load_reward_scorer(scorer_dir, cfg, grounding or GroundingConfig(), str(acc.device))
    configs = {"model": model_cfg.model_dump(mode="json"), "scst": cfg.model_dump(mode="json"),
               "generate": gen_cfg.model_dump(mode="json"), "dev_images": dev_images,
               **({"scorer": scorer.fingerprint} if scorer else {})}
    loop = TrainLoop(
        stage="scst", model=model, processor=processor, prompt=model_cfg.prompt,
        base_name=str(sft_model_dir), strategy=cfg.finetune.strategy, cfg=cfg, gen_cfg=gen_cfg,
        valid=select_on, configs={**configs, "sft_model": str(sft_model_dir)}, on_metrics=on_metrics,
        identity=run_identity(configs, read_report(train_dir)["fingerprint"], model_fingerprint(sft_model_dir)),
        accelerator=acc,
    )
    reward = CombinedReward(read_references(train_dir), cfg.reward, scorer)
    answer = max(cfg.max_new_tokens, cfg.max_answer_tokens if cfg.xe_weight > 0 else 0)
    check_token_budget(train, loop.builder, answer, model_token_limit(model, model_cfg.max_seq_len))
    return loop.run(train, SCSTStep(loop, cfg, reward, gen_cfg))


def load_reward_scorer(scorer_dir: str | Path | None, cfg: SCSTConfig, grounding: GroundingConfig, device: str):
    """The grounding scorer when a reward term needs it, blind to the attributes its probe does not
    reach `grounding.min_pairwise_acc` on (said in the log), else None."""
    if not cfg.reward.needs_scorer:
        return None
    if scorer_dir is None:
        raise EcomcapError("scst.reward.clip / distinct need the grounding scorer: set grounding.enabled: true")
    from ecomcap.grounding.scorer import GroundingScorer

    scorer = GroundingScorer(scorer_dir, device=device, w=grounding.clip_w)
    trusted, weak = scorer.trusted_fields(grounding.min_pairwise_acc)
    scorer.blind_to(weak, grounding.attribute_vocab or scorer.quality.get("vocab") or {})
    log.info("grounding reward: scorer %s; attributes it sees (probe >= %.0f%%): %s", scorer.fingerprint,
             100 * grounding.min_pairwise_acc, ", ".join(trusted) or "none")
    if weak:
        probe = scorer.quality.get("probe", {})
        log.warning("grounding reward: the scorer is below %.0f%% on %s (probe %s): those words are removed "
                    "from the captions it scores, so the reward neither pays nor charges for them",
                    100 * grounding.min_pairwise_acc, ", ".join(weak),
                    ", ".join(f"{f} {100 * probe[f]['accuracy']:.1f}%" for f in weak))
    return scorer
