"""Supervised fine-tuning: teacher-forced cross-entropy (label smoothing) on the references."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ecomcap.config import SPEED_ONLY, FinetuneConfig, GenerateConfig, ModelConfig, SFTConfig
from ecomcap.data.augment import augment
from ecomcap.data.lengths import decode_length
from ecomcap.data.shards import read_report
from ecomcap.inference.generate import with_length
from ecomcap.modeling.load import expected_dtype, load_base
from ecomcap.modeling.strategies import apply_strategy, quantization_config
from ecomcap.training.answer_loss import answer_loss
from ecomcap.training.budget import check_token_budget, model_token_limit
from ecomcap.training.collate import IGNORE, with_answers
from ecomcap.training.data import Example, train_and_dev
from ecomcap.training.identity import model_fingerprint, run_identity
from ecomcap.training.loop import MetricsCallback, StageResult, TrainLoop, make_accelerator
from ecomcap.training.microbatches import data_workers
from ecomcap.training.prompt_cache import ImageCache, PromptCache

log = logging.getLogger(__name__)


def sft_identity(train_dir: str | Path, model_cfg: ModelConfig, ft_cfg: FinetuneConfig, cfg: SFTConfig,
                 dev_images: int) -> tuple[dict, str]:
    """(the configs an SFT run records, its run identity): what `run_sft` trains under, and what
    the SCST stage looks up to start from the SFT run of *this* config."""
    configs = {"model": model_cfg.model_dump(mode="json"), "finetune": ft_cfg.model_dump(mode="json"),
               # augmentation off leaves the identity as it was before augmentation existed (runs resume)
               "sft": cfg.model_dump(mode="json", exclude=SPEED_ONLY["sft"] | ({"augment"} if not cfg.augment.enabled
                                                                               else set())),
               "dev_images": dev_images}
    return configs, run_identity(configs, read_report(train_dir)["fingerprint"], model_fingerprint(model_cfg.name_or_path))


def sft_output(train_dir: str | Path, model_cfg: ModelConfig, ft_cfg: FinetuneConfig, cfg: SFTConfig,
               dev_images: int) -> Path | None:
    """The model the finished SFT run of this config handed on (best, else final), if any."""
    run = Path(cfg.output_dir) / f"run-{sft_identity(train_dir, model_cfg, ft_cfg, cfg, dev_images)[1]}"
    return next((d for d in (run / "best", run / "model") if d.is_dir() and not (run / "checkpoints").is_dir()), None)


def run_sft(
    train_dir: str | Path,
    valid_dir: str | Path | None,
    model_cfg: ModelConfig,
    ft_cfg: FinetuneConfig,
    cfg: SFTConfig,
    gen_cfg: GenerateConfig | None = None,
    on_metrics: MetricsCallback | None = None,
    dev_images: int = 0,
    brands: list[str] | None = None,
) -> StageResult:
    """Fine-tune `model_cfg`'s model on an ingested train split; returns the exported model.

    `dev_images` > 0: the best checkpoint is picked on that many training images held out
    (by id), not on `valid_dir`, which then stays unseen for the promotion gate. `brands`: the
    brand lexicon; each validation then also logs brand accuracy (val_brand_micro / _macro).
    """
    from ecomcap.modeling.prepare import ensure_model

    torch.manual_seed(cfg.seed)  # adapter init and sampling follow the seed, not the process history
    ensure_model(model_cfg, train_dir)
    acc = make_accelerator(cfg, dtype=expected_dtype(model_cfg))  # first: ZeRO-3 then loads sharded
    model, processor = load_base(model_cfg, quantization_config(ft_cfg), packed=cfg.packing)
    model, _ = apply_strategy(model, ft_cfg)
    length = decode_length(train_dir, processor.tokenizer)  # recorded in the model; validation decodes with it
    gen_cfg = with_length(gen_cfg or GenerateConfig(), length)
    train, select_on = train_and_dev(train_dir, valid_dir, dev_images)
    configs, identity = sft_identity(train_dir, model_cfg, ft_cfg, cfg, dev_images)
    loop = TrainLoop(
        stage="sft", model=model, processor=processor, prompt=model_cfg.prompt,
        base_name=model_cfg.name_or_path, strategy=ft_cfg.strategy, cfg=cfg, gen_cfg=gen_cfg,
        valid=select_on, configs=configs, on_metrics=on_metrics, expand_references=cfg.references == "expand",
        identity=identity, accelerator=acc,
    )
    loop.marker["max_new_tokens"] = length
    loop.brands = list(brands or [])
    builder = loop.builder
    # each DataLoader worker would fill its own copy and rarely see an image again: off with workers
    budget = 0 if data_workers(cfg, loop.acc) else cfg.prompt_cache_mb * 2**20
    aug = cfg.augment
    # augmenting: pixels change every step, so keep decoded images and run the processor after augmenting
    cache = ImageCache(budget) if aug.enabled else PromptCache(builder, budget, int(cfg.prompt_cache_max_row_mb * 2**20))

    def prepare(examples: list[Example]):
        """CPU side of a step (run ahead in DataLoader workers): the processed batch and its token count."""
        if aug.enabled:
            prompts = builder.prompts([augment(cache.get(e.index, e.load), aug, e.draw, e.index) for e in examples])
        else:
            by_row = {e.index: e for e in examples}
            prompts = cache.prompts([e.index for e in examples], lambda rows: [by_row[r].image for r in rows])
        answers = builder.answer_ids([e.answer for e in examples], cfg.max_answer_tokens)
        batch = with_answers(prompts, answers, builder.pad_id)
        return batch, float((batch.labels != IGNORE).sum())

    def step(prepared):
        batch, tokens = prepared
        loss = answer_loss(loop.model, batch.to(loop.acc.device), cfg.label_smoothing, cfg.loss_chunk_tokens,
                           cfg.packing)
        return loss, {"answer_tokens": tokens}

    step.prepare = prepare

    check_token_budget(train, builder, cfg.max_answer_tokens, model_token_limit(model, model_cfg.max_seq_len))
    result = loop.run(train, step)
    log.info("sft: %s", cache.summary())
    return result
