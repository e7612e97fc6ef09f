"""Functions `ecomcap.launch` runs in fresh processes for the killed-run tests in
tests/test_resume_launch.py (not tests). Every rank writes `<run>-rank{r}.json` with its facts."""
import json
import os
from pathlib import Path

import torch

from ecomcap.config import FinetuneConfig, GenerateConfig, ModelConfig, SCSTConfig, SFTConfig

GEN = GenerateConfig(num_beams=1, max_new_tokens=6)


def _cfg(stage: str, out: Path, strategy: str, **kw):
    if stage == "sft":
        return SFTConfig(output_dir=out, max_steps=4, batch_size=2, grad_accum=2, eval_every=2, eval_images=2,
                         save_every=2, label_smoothing=0.0, lr=5e-3 if strategy == "lora" else 1e-3, **kw)
    return SCSTConfig(output_dir=out, max_steps=4, batch_size=2, samples=2, max_new_tokens=6, lr=1e-3, eval_every=0,
                      eval_images=2, save_every=1, logprob_chunk=2,
                      finetune=FinetuneConfig(strategy=strategy, lora_r=4, lora_dropout=0.0), **kw)


def _run(stage: str, data: dict, model_dir: str, out: Path, strategy: str, sft_model: str | None = None,
         **kw) -> dict:
    from ecomcap.training.scst import run_scst
    from ecomcap.training.sft import run_sft

    cfg, model_cfg = _cfg(stage, out, strategy, **kw), ModelConfig(name_or_path=model_dir)
    if stage == "sft":
        res = run_sft(data["train"], data["valid"], model_cfg, FinetuneConfig(strategy=strategy, lora_r=4,
                                                                               lora_dropout=0.0), cfg, GEN)
    else:  # (without `sft_model` the tiny base model stands in for the SFT output)
        res = run_scst(sft_model or model_dir, data["train"], data["valid"], model_cfg, cfg, GEN)
    facts = {"digest": res.param_digest, "steps": res.steps, "resumed_from": res.resumed_from,
             "run_dir": str(res.final_dir.parent), "world": int(os.environ.get("WORLD_SIZE", "1"))}
    Path(out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(facts))
    return facts


def _uneven_randomness() -> None:
    """Rank 1 draws one extra number per SCST step, as a rank whose samples end at other lengths
    than rank 0's does with a real model (the tiny one always samples to max_new_tokens): the
    ranks' generators then differ, so a resume is exact only if each rank restores its own."""
    from ecomcap.training.scst import SCSTStep

    step = SCSTStep.__call__

    def call(self, examples):
        torch.rand(1)
        return step(self, examples)

    SCSTStep.__call__ = call


def _record_merge(out: str) -> None:
    """Spy (records only) on SCST's adapter merge (in `start_tuning`): rank r writes
    out/merged-rank{r}.json with the merged weights of one projection LoRA changed, gathered whole
    when ZeRO-3 partitioned them."""
    from ecomcap.training import tuning

    merge = tuning.merge_adapter

    def merged(model):
        model = merge(model)
        name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                value = p.detach().clone()
        else:
            value = p.detach().clone()
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"merged-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
            {"name": name, "partitioned": hasattr(p, "ds_id"), "values": value.flatten().tolist()}))
        return model

    tuning.merge_adapter = merged


def train(stage: str, data: dict, model_dir: str, out: str, strategy: str, stop_after: int | None = None,
          whole: bool = False, sft_model: str | None = None) -> dict:
    """`whole`: first the uninterrupted run into out/whole. Then the run into out/cut, stopped as if
    killed after `stop_after` steps (these processes then exit with the error) or, resumed."""
    torch.set_num_threads(1)
    if stage == "scst" and os.environ.get("RANK") == "1":
        _uneven_randomness()
    if sft_model:
        _record_merge(out)
    if whole:
        _run(stage, data, model_dir, Path(out, "whole"), strategy, sft_model)
    return _run(stage, data, model_dir, Path(out, "cut"), strategy, sft_model, stop_after_steps=stop_after)
