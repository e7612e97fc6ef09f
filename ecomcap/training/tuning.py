"""What the stages that tune a finished model with a reward (SCST, DPO) set up alike: the start
model merged and given a fresh adapter (or other strategy), dropout off, the training and
checkpoint-selection images, the grounding scorer when a reward term needs it, and the loop
with a run identity that covers every setting that changes what is trained."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ecomcap.config import SPEED_ONLY, GenerateConfig, GroundingConfig, ModelConfig
from ecomcap.data.shards import read_report
from ecomcap.errors import EcomcapError
from ecomcap.inference.generate import with_length
from ecomcap.modeling.load import expected_dtype, load_trained
from ecomcap.modeling.partitions import merge_adapter
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.data import ShardImages, train_and_dev
from ecomcap.training.identity import model_fingerprint, run_identity
from ecomcap.training.loop import MetricsCallback, TrainLoop, make_accelerator

log = logging.getLogger(__name__)


def disable_dropout(model: torch.nn.Module) -> int:
    """One policy for sampling (eval mode), the log-prob pass (train mode) and the reference
    (adapter off): with LoRA dropout on only in the log-prob pass, the gradient would be taken
    for another policy than the one that sampled (TRL disables dropout for the same reason)."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
    return n


def start_tuning(stage: str, loop_cls: type[TrainLoop], start_dir: str | Path, train_dir: str | Path,
                 valid_dir: str | Path | None, model_cfg: ModelConfig, cfg, gen_cfg: GenerateConfig,
                 on_metrics: MetricsCallback | None, dev_images: int, scorer_dir: str | Path | None,
                 grounding: GroundingConfig, start_key: str = "start_model",
                 extra: dict[str, Any] | None = None) -> tuple[TrainLoop, ShardImages, Any, Any, GenerateConfig]:
    """(loop, training images, reward scorer or None, the stage's config and the generate config with
    max_new_tokens resolved) of a tuning stage; `extra`: more settings that change what is trained
    (hashed into the run identity with the stage's config)."""
    torch.manual_seed(cfg.seed)  # adapter init and sampling follow the seed, not the process history
    length = start_decode_length(start_dir, train_dir)
    cfg, gen_cfg = with_length(cfg, length), with_length(gen_cfg, length)  # SCST samples as long as the data asks
    acc = make_accelerator(cfg, dtype=expected_dtype(model_cfg))  # first: ZeRO-3 then loads sharded
    # 4-bit base for QLoRA (whatever SFT used), as evaluation and export will load it
    model, processor = load_trained(start_dir, model_cfg, quantized=cfg.finetune.strategy == "qlora")
    if hasattr(model, "merge_and_unload"):
        model = merge_adapter(model)  # (gathering each weight of a ZeRO-3 partitioned base)
    model, _ = apply_strategy(model, cfg.finetune)
    disable_dropout(model)
    train, select_on = train_and_dev(train_dir, valid_dir, dev_images)
    scorer = load_reward_scorer(scorer_dir, stage, cfg, grounding, str(acc.device))
    configs = {"model": model_cfg.model_dump(mode="json"), stage: cfg.model_dump(mode="json", exclude=SPEED_ONLY[stage]),
               "generate": gen_cfg.model_dump(mode="json"), "dev_images": dev_images, **(extra or {}),
               **({"scorer": scorer.fingerprint, "grounding": grounding.model_dump(
                   mode="json", include={"clip_w", "min_pairwise_acc", "attribute_vocab"})} if scorer else {})}
    loop = loop_cls(
        stage=stage, model=model, processor=processor, prompt=model_cfg.prompt, base_name=str(start_dir),
        strategy=cfg.finetune.strategy, cfg=cfg, gen_cfg=gen_cfg, valid=select_on,
        configs={**configs, start_key: str(start_dir)}, on_metrics=on_metrics,
        identity=run_identity(configs, read_report(train_dir)["fingerprint"], model_fingerprint(start_dir)),
        accelerator=acc)
    loop.marker["max_new_tokens"] = length  # handed on: generation after this stage decodes as long
    return loop, train, scorer, cfg, gen_cfg


def start_decode_length(start_dir: str | Path, train_dir: str | Path) -> int:
    """The decoding length the start model recorded (SFT counted it on its data), else the data's."""
    from ecomcap.data.lengths import decode_length
    from ecomcap.modeling.load import read_output_marker
    from ecomcap.modeling.processor import load_processor

    info = read_output_marker(start_dir) if Path(start_dir).is_dir() else None
    if info and info.get("max_new_tokens"):
        return int(info["max_new_tokens"])
    return decode_length(train_dir, load_processor(start_dir).tokenizer)


def load_reward_scorer(scorer_dir: str | Path | None, stage: str, cfg, grounding: GroundingConfig, device: str):
    """The grounding scorer when a reward term needs it, blind to the attributes its probe does not
    reach `grounding.min_pairwise_acc` on (said in the log), else None."""
    if not cfg.reward.needs_scorer:
        return None
    if scorer_dir is None:
        raise EcomcapError(f"{stage}.reward.clip / distinct need the grounding scorer: set grounding.enabled: true "
                           "in the pipeline, or pass `ecomcap train --grounding DIR` (a grounding step's output)")
    from ecomcap.grounding.scorer import GroundingScorer

    scorer = GroundingScorer(scorer_dir, device=device, w=grounding.clip_w)
    trusted, weak = scorer.trusted_fields(grounding.min_pairwise_acc)
    scorer.blind_to(weak, grounding.attribute_vocab or scorer.quality.get("vocab") or {})
    log.info("%s grounding reward: scorer %s; attributes it sees (probe >= %.0f%%): %s", stage, scorer.fingerprint,
             100 * grounding.min_pairwise_acc, ", ".join(trusted) or "none")
    if weak:
        probe = scorer.quality.get("probe", {})
        log.warning("%s grounding reward: the scorer is below %.0f%% on %s (probe %s): those words are removed "
                    "from the captions it scores, so the reward neither pays nor charges for them", stage,
                    100 * grounding.min_pairwise_acc, ", ".join(weak),
                    ", ".join(f"{f} {100 * probe[f]['accuracy']:.1f}%" for f in weak))
    return scorer
