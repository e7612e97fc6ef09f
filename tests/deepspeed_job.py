"""Run by `accelerate launch` (2 CPU processes, gloo) from tests/test_deepspeed.py (not a test).

argv: train valid model_dir out strategy mode
- mode "sft": one SFT run (4 steps, 2 images x 2 accumulation steps per process, validation and a
  checkpoint every 2 steps) into out/run;
- mode "scst": 2 SCST steps over the tiny model as its "SFT output", into out/scst.
Each rank writes out/rank{r}.json: steps, digest of its trainable weights, launch facts, and
what this rank held right after its first model load (`first_load`: a spy on the stage's
`load_base`, which only records), and its process group's collective timeout.
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from ecomcap.config import FinetuneConfig, GenerateConfig, ModelConfig, SCSTConfig, SFTConfig
from ecomcap.training import sft as sft_module
from ecomcap.training import tuning as tuning_module
from ecomcap.training.accelerator import group_timeout
from ecomcap.training.scst import run_scst
from ecomcap.training.sft import run_sft

train, valid, model_dir, out, strategy, mode = sys.argv[1:7]
torch.set_num_threads(1)
out = Path(out)
model_cfg = ModelConfig(name_or_path=model_dir)
ft = FinetuneConfig(strategy=strategy, lora_r=4, lora_dropout=0.0)
gen = GenerateConfig(num_beams=1, max_new_tokens=6)
facts = {}


def held(model) -> dict:
    """Parameter elements this process holds (a ZeRO-3 partition's own shard) vs the model's."""
    params = list(model.parameters())
    return {"partitioned": all(hasattr(p, "ds_numel") for p in params),
            "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "total": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


def spy(load):
    def first_load(*args, **kw):
        model, processor = load(*args, **kw)
        facts.setdefault("first_load", held(model))
        return model, processor
    return first_load


sft_module.load_base = spy(sft_module.load_base)
tuning_module.load_trained = spy(tuning_module.load_trained)  # SCST loads its start model there


def sft(dest: str, **kw):
    cfg = SFTConfig(output_dir=out / dest, max_steps=4, batch_size=2, grad_accum=2, lr=5e-3 if strategy == "lora" else 1e-3,
                    eval_every=2, eval_images=2, save_every=2, label_smoothing=0.0, **kw)
    return run_sft(train, valid, model_cfg, ft, cfg, gen)


if mode == "sft":
    res = sft("run")
elif mode == "scst":
    cfg = SCSTConfig(output_dir=out / "scst", max_steps=2, batch_size=2, samples=2, max_new_tokens=6, lr=1e-4,
                     eval_every=0, eval_images=2, save_every=1, logprob_chunk=2,
                     finetune=FinetuneConfig(strategy="lora", lora_r=4))
    res = run_scst(model_dir, train, valid, model_cfg, cfg, gen)
else:
    raise SystemExit(f"unknown mode {mode}")

state = PartialState()
facts.update(timeout_s=group_timeout().total_seconds(), steps=res.steps, digest=res.param_digest, world=state.num_processes,
             distributed_type=str(state.distributed_type), model_dir=str(res.final_dir))
Path(out, f"rank{state.process_index}.json").write_text(json.dumps(facts))

from ecomcap.launch import leave_group  # noqa: E402

leave_group()  # else a rank can abort at exit (SIGABRT) after a good run
