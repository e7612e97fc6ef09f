"""Run by `accelerate launch` (2 CPU processes, gloo) from tests/test_zero3_generation.py (not a test).

argv: valid model_dir out. Each rank loads the tiny model through the SFT stage's path (under a
ZeRO-3 launch: into partitions), builds the training loop, and writes out/rank{r}.json with:
- `per_token`: every validation image captioned the way it was before (every rank all images,
  each decoded token's forward all-gathering every layer, ranks in step: synced_gpus);
- `gathered`: the same images under `gathered_for_generation` (parameters gathered once);
- `sharded`: `validation_captions` (each rank every 2nd image, gathered across ranks);
- `not_gathered`: `validation_captions` with `gather_for_generation` off and batches of 2;
- `fetches_per_token` / `fetches_gathered`: how often DeepSpeed fetched partitions during each pass.
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from ecomcap.config import FinetuneConfig, GenerateConfig, ModelConfig, SFTConfig
from ecomcap.inference.generate import caption_images
from ecomcap.modeling.load import expected_dtype, load_base
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.data import ShardImages
from ecomcap.training.loop import TrainLoop, make_accelerator
from ecomcap.training.zero import gathered_for_generation, zero_stage

valid, model_dir, out = sys.argv[1:4]
torch.set_num_threads(1)
torch.manual_seed(0)
model_cfg = ModelConfig(name_or_path=model_dir)
cfg = SFTConfig(output_dir=Path(out) / "run", max_steps=1, batch_size=1, eval_images=5, eval_beams=2)
gen = GenerateConfig(num_beams=1, max_new_tokens=6)
acc = make_accelerator(cfg, dtype=expected_dtype(model_cfg))
model, processor = load_base(model_cfg)
model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.0))
data = ShardImages(valid)
loop = TrainLoop(stage="sft", model=model, processor=processor, prompt=model_cfg.prompt, base_name=model_dir,
                 strategy="lora", cfg=cfg, gen_cfg=gen, valid=data, configs={})
images = [data.image(i) for i in range(cfg.eval_images)]
eval_gen = gen.model_copy(update={"num_beams": cfg.eval_beams})
inner = acc.unwrap_model(loop.model)
loop.model.eval()

fetches = []
if zero_stage(acc) == 3:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    real_fetch = PartitionedParameterCoordinator.fetch_sub_module
    PartitionedParameterCoordinator.fetch_sub_module = lambda self, *a, **k: (fetches.append(1), real_fetch(self, *a, **k))[1]
per_token = caption_images(inner, loop.builder, images, eval_gen, progress=False)
fetched_per_token = len(fetches)
with gathered_for_generation(acc, loop.model) as gathered:
    gathered_caps = caption_images(inner, loop.builder, images, eval_gen, progress=False)
fetched_gathered = len(fetches) - fetched_per_token
sharded = loop.validation_captions(images)
after = caption_images(inner, loop.builder, images, eval_gen, progress=False)  # the hooks are back
# gathering off, batches of 2: sharded, the ranks would run 2 and 1 collective generate calls and hang
loop.cfg = cfg.model_copy(update={"gather_for_generation": False})
loop.gen_cfg = gen.model_copy(update={"batch_size": 2})
not_gathered = loop.validation_captions(images)

state = PartialState()
Path(out, f"rank{state.process_index}.json").write_text(json.dumps({
    "world": state.num_processes, "zero_stage": zero_stage(acc), "did_gather": gathered,
    "per_token": per_token, "gathered": gathered_caps, "sharded": sharded, "after": after,
    "not_gathered": not_gathered,
    "fetches_per_token": fetched_per_token, "fetches_gathered": fetched_gathered}, ensure_ascii=False))

from ecomcap.launch import leave_group  # noqa: E402

leave_group()
