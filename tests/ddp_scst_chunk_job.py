"""Run by `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) from
tests/test_distributed.py (not a test).

Each rank scores its own images' sampled captions through the SCST stage's `policy_logprob`
(DDP-wrapped model; with `lora_vision` the deferred path: chunks as non-synced micro-steps, the
last one returned for the loop's backward), once unchunked and once in chunks of 2 rows, and
writes its all-reduced gradients, so the test can compare chunked with unchunked and rank with rank.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from ecomcap.config import FinetuneConfig, ModelConfig, SCSTConfig
from ecomcap.modeling.load import load_base
from ecomcap.modeling.processor import suppressed_token_ids
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.data import ShardImages
from ecomcap.training.logprob import policy_logprob

train, model_dir, out, lora_vision = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
K = 3
torch.set_num_threads(1)
acc = Accelerator(cpu=True)
cfg = ModelConfig(name_or_path=model_dir)
model, processor = load_base(cfg)
torch.manual_seed(0)  # the same adapter on both ranks
model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.0, lora_vision=lora_vision))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
model.train()
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
model, opt = acc.prepare(model, opt)
pb = PromptBuilder(processor, cfg.prompt)
data = ShardImages(train)
rank = acc.process_index
enc = pb.prompts([data.image(2 * rank), data.image(2 * rank + 1)])  # each rank its own images
g = torch.Generator().manual_seed(10 + rank)
seqs = [torch.randint(10, 200, (n - 1,), generator=g).tolist() + [pb.eos_id] for n in (5, 1, 7, 3, 6, 2)]
adv = torch.randn(6, generator=g)
loop = SimpleNamespace(acc=acc, model=model, builder=pb)
results = {}
rows: list[int] = []
acc.unwrap_model(model).register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
for chunk in (0, 2):
    rows.clear()
    policy = policy_logprob(loop, SCSTConfig(logprob_chunk=chunk, kl_weight=0.1), suppressed_token_ids(processor))
    loss, logs = policy(enc, seqs, K, adv)
    if loss.requires_grad:  # what TrainLoop does with a deferred loss
        acc.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()
             if p.requires_grad and p.grad is not None}
    opt.zero_grad(set_to_none=True)
    results[chunk] = grads
    results[f"loss{chunk}"] = torch.tensor([float(loss.detach())])
    results[f"deferred{chunk}"] = torch.tensor([float(policy.backward is None)])
    results[f"rows{chunk}"] = torch.tensor([max(rows)])  # the most rows in one forward
save_file({f"c{c}/{n}": t for c in (0, 2) for n, t in results[c].items()}
          | {k: v for k, v in results.items() if isinstance(k, str)}, str(out / f"rank{rank}.safetensors"))

from ecomcap.launch import leave_group  # noqa: E402

leave_group()  # else a rank can abort at exit (SIGABRT) after a good run
