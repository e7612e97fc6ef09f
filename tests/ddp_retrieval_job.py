"""Run by `ecomcap.launch` in 2 CPU processes (gloo) from tests/test_retrieval_ddp.py (not a test);
the test runs the same functions in its own process for the one-process reference.

Each rank takes its micro-batch of step 0 (hard negatives, attribute-swapped texts, siblings for
the same-product term), runs the real retrieval step (gathered embeddings, averaged gradients)
for each loss with and without gradient caching, and writes the loss and gradients it ends with;
then a 3-step `train_retriever` run (hard negatives mined on rank 0 at step 1) and its weights' hash.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ecomcap.retrieval.config import (
    EncoderConfig,
    HardNegativeConfig,
    RetrievalRunConfig,
    RetrievalTrainConfig,
)
from ecomcap.retrieval.data.batches import Batch, TrainingSet
from ecomcap.retrieval.data.swaps import AttributeSwapper, synthetic_vocab
from ecomcap.retrieval.train.loop import (
    RetrievalLoop,
    make_step_fn,
    prepare_encoder,
    train_retriever,
)

B = 4  # pairs per rank
VARIANTS = [("infonce", None), ("infonce", 3), ("sigmoid", None), ("sigmoid", 3)]


def run_config(model_dir: str, out: str, loss: str = "infonce", chunk: int | None = None, start_step: int = 0,
               **train) -> RetrievalRunConfig:
    hn = HardNegativeConfig(enabled=True, start_step=start_step, per_example=2, rank_window=(2, 30), per_query=3)
    return RetrievalRunConfig(
        encoder=EncoderConfig(name_or_path=model_dir, item_embedding="fused", device="cpu"),
        train=RetrievalTrainConfig(output_dir=out, batch_size=B, mixed_precision="no", loss=loss,
                                   grad_cache_chunk=chunk, match_weight=0.5, text_negatives=2, eval_every=0,
                                   hard_negatives=hn, **train))


def setup(train: str, model_dir: str, negatives: str, out: str) -> tuple[RetrievalLoop, TrainingSet]:
    data = TrainingSet(train)
    data.negatives = json.loads(Path(negatives).read_text())  # fixed "mined" negatives: no mining pass
    data.swapper = AttributeSwapper(synthetic_vocab())
    cfg = run_config(model_dir, out)
    dual, pre, _ = prepare_encoder(cfg, [])
    loop = RetrievalLoop(dual=dual, pre=pre, cfg=cfg, valid_dir=None, base_name=model_dir)
    loop.dual.eval()  # no dropout: one process and two draw different masks; the arithmetic is compared
    return loop, data


def loss_and_grads(loop: RetrievalLoop, data: TrainingSet, cfg: RetrievalRunConfig,
                   batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-step as `TrainLoop.run` does it, the gradients it leaves (then cleared)."""
    step = make_step_fn(loop, data, cfg)
    with loop.acc.accumulate(loop.model):
        loss, _ = step(batch)
        if loss.requires_grad or not step.does_backward:
            loop.acc.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in loop.dual.named_parameters() if p.grad is not None}
    loop.opt.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def gradients(train: str, model_dir: str, negatives: str, out: str) -> dict:
    """Launch target: every rank writes rank{r}.pt ({variant: (loss, grads)}, its batch)."""
    loop, data = setup(train, model_dir, negatives, str(Path(out) / "run"))
    rank = loop.acc.process_index
    batch = loop.examples_for(data, 0, 0)
    res = {f"{loss}/{chunk}": loss_and_grads(loop, data, run_config(model_dir, out, loss, chunk), batch)
           for loss, chunk in VARIANTS}
    # and a short real run: hard negatives mined at step 1 (rank 0, broadcast), DDP steps after it
    run = train_retriever(train, None, run_config(model_dir, str(Path(out) / "train"), chunk=3, start_step=1,
                                                  max_steps=3, save_every=0))
    torch.save({"results": res, "batch": batch, "world": loop.acc.num_processes, "steps": run.steps,
                "digest": run.param_digest, "threads": os.environ.get("OMP_NUM_THREADS")},
               Path(out) / f"rank{rank}.pt")
    return {"world": loop.acc.num_processes}
