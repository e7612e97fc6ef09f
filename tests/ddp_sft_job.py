"""Run by `accelerate launch --num_processes 2 --cpu` from tests/test_distributed.py (not a test).

Each rank runs the same tiny LoRA SFT and writes the hash of its trainable weights, so the test
can check that DDP kept the ranks identical.
"""
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from ecomcap.config import FinetuneConfig, GenerateConfig, ModelConfig, SFTConfig
from ecomcap.training.sft import run_sft

train, valid, model_dir, out = sys.argv[1:5]
torch.set_num_threads(1)
res = run_sft(train, valid, ModelConfig(name_or_path=model_dir), FinetuneConfig(strategy="lora", lora_r=4),
              SFTConfig(output_dir=out, max_steps=3, batch_size=2, lr=5e-3, eval_every=3, eval_images=2,
                        save_every=2), GenerateConfig(num_beams=1, max_new_tokens=6))
rank = PartialState().process_index
Path(out, f"rank{rank}.txt").write_text(f"{res.steps} {res.param_digest} {PartialState().num_processes}\n")

from ecomcap.launch import leave_group  # noqa: E402

leave_group()  # else a rank can abort at exit (SIGABRT) after a good run
