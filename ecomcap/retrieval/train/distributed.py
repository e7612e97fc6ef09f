"""Contrastive training over several processes: global negatives by gathering embeddings.

A contrastive loss is only as good as its batch: with W processes of B pairs each, every query
should see all W·B items as negatives (Chinese-CLIP's global batch of 1,024 on 8 GPUs), not its
own rank's B. Each rank therefore:

1. gathers every rank's `Batch` (indices and texts, no pixels) and merges them into the batch
   one process would see (`TrainingSet.merge`: the global positive / same-product masks);
2. embeds its own rows only, then gathers the embeddings of all ranks (`gather_rows`), so the
   loss runs on the merged batch, identical on every rank;
3. back-propagates that loss into its own towers and averages the parameter gradients over the
   ranks (`average_gradients`) before the optimizer step.

Gradient math (why the result equals one process on the W·B batch). Every rank computes the
same global loss L. The gather's backward sums the incoming gradient over the ranks (as
`torch.distributed.nn.functional.all_gather` does) and hands each rank its own rows' slice:
W·dL/de_r, since each of the W identical losses contributes dL/de_r. Rank r's tower gradient is
then W·g_r, g_r being the part of dL/dθ that flows through its rows; the logit scale and bias,
outside the gather, get the full dL/dt on every rank. Averaging over ranks gives
(1/W)·Σ_r W·g_r = Σ_r g_r = dL/dθ for the towers and dL/dt for the scale/bias: the one-process
gradient, with no loss rescaling. (Without the sum in backward the towers would get 1/W of it
while the scale kept its full gradient.)

Why our own all-reduce and not DDP's: the towers run on the unwrapped module (gradient caching
embeds in many chunks per tower and back-propagates each chunk again; the two towers touch
disjoint parameters), so DDP's reducer, armed only by a forward through the wrapper, never
fires. One bucketed all-reduce per optimizer step, after the last micro-step's backward, serves
the one-shot and the gradient-cached paths alike; it does not overlap communication with the
backward as DDP would.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from ecomcap.retrieval.data.batches import Batch

BUCKET_ELEMENTS = 25 * 2**20  # gradients flattened and all-reduced this many elements at a time (100 MB fp32)


def world() -> tuple[int, int]:
    """(process count, this rank): (1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_batches(batch: Batch) -> list[Batch]:
    """Every rank's batch of this micro-step, in rank order (small: indices and texts)."""
    out: list = [None] * world()[0]
    dist.all_gather_object(out, batch)
    return out


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; ranks may hold different numbers of rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        most = max(sizes)
        padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss has a say in every row (see the module docstring)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """[sum(sizes), ...]: rank r's `x` (sizes[r] rows) at rows sum(sizes[:r]).. ; gradients flow
    back to this rank's own rows only (summed over the ranks' losses)."""
    return _GatherRows.apply(x, tuple(sizes), world()[1])


def _sections(b: Batch) -> list[int]:
    """Rows of each tower a rank embeds: queries, items, siblings, negative texts."""
    return [len(b.query_texts), len(b.items), len(b.siblings or []), len(b.negative_texts or [])]


def gather_embeddings(q: torch.Tensor, d: torch.Tensor, s: torch.Tensor | None, n: torch.Tensor | None,
                      parts: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """This rank's tower outputs -> the merged batch's (`TrainingSet.merge` order): one
    collective for all four. A rank without negative texts passes None and sends no rows."""
    empty = q.new_zeros((0, q.shape[1]))
    local = torch.cat([q, d, s if s is not None else empty, n if n is not None else empty])
    sections = [_sections(p) for p in parts]
    rows = gather_rows(local, [sum(c) for c in sections]).split([x for c in sections for x in c])
    qs, ds, ss, ns = (rows[i::4] for i in range(4))
    pairs = [x[: len(p.query_texts)] for x, p in zip(ds, parts)]
    hard = [x[len(p.query_texts):] for x, p in zip(ds, parts)]
    s_all = torch.cat(ss) if parts[0].siblings is not None else None
    n_all = torch.cat(ns) if any(p.negative_texts for p in parts) else None
    return torch.cat(qs), torch.cat(pairs + hard), s_all, n_all


def average_gradients(params: Iterable[torch.nn.Parameter], bucket: int = BUCKET_ELEMENTS) -> None:
    """All-reduce the trainable parameters' gradients to their mean over the ranks. A gradient
    one rank lacks (its rows never reached that parameter) counts as zeros there, so every rank
    sends the same tensors in the same order."""
    size = world()[0]
    if size == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    live = [p for p in params if p.grad is not None]
    for group in _buckets(live, bucket):
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= size
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


def _buckets(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of one gradient dtype and device, each up to `limit` elements."""
    out: list[list[torch.nn.Parameter]] = []
    count = 0
    for p in params:
        g = p.grad
        if not out or count + g.numel() > limit or (out[-1][0].grad.dtype, out[-1][0].grad.device) != (g.dtype, g.device):
            out.append([])
            count = 0
        out[-1].append(p)
        count += g.numel()
    return out
