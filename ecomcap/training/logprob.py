"""SCST's log-prob pass sized for a GPU: each image encoded once, sequences in micro-batches.

With the 3B defaults a step scores 16 images x 5 samples = 80 sequences of ~560 tokens. Done in
one forward that is 80 vision-tower passes (each image's pixels repeated K times) and 80
sequences of activations and vocabulary-wide logits alive at once. Here:

- each image goes through the vision tower once; its features are handed to the K sample rows
  (`mm_encoder_outputs`), so the tower's cost and memory no longer scale with K;
- the sequences are scored `chunk` at a time, each chunk's loss backwarded at once (gradient
  accumulation inside the step), so only one chunk's activations are alive;
- when the vision tower trains, the chunks' gradients collect on detached copies of the
  features and flow through the tower in one backward at the end.

Every term is a sum over sequences or tokens divided by a total known up front, so the chunked
loss and gradients equal the unchunked ones (tests/test_logprob.py checks it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ecomcap.training.collate import with_answers
from ecomcap.training.losses import kl_k3_sum, sequence_logprob, token_logprobs


def vision_trains(model) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if ".visual." in n)


def encode_images(model, enc: dict[str, torch.Tensor], grad: bool) -> list[torch.Tensor]:
    """Merged vision features per image of a prompt batch (one tower pass per image)."""
    with torch.set_grad_enabled(grad):
        out = model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
    return list(out.pooler_output)


@dataclass
class PolicyLogprob:
    """Policy-gradient (+ k3 KL to the adapter-off model) loss of sampled captions, computed and
    backwarded `chunk` sequences at a time (0: all at once)."""

    model: torch.nn.Module  # the (possibly DDP-wrapped) training model: chunk forwards go through it
    inner: torch.nn.Module  # the unwrapped model: vision tower and adapter switch
    pad_id: int
    suppress: Sequence[int] = ()
    length_normalize: bool = False
    kl_weight: float = 0.0
    chunk: int = 0
    # None: the last chunk's loss is returned with its graph for the loop's backward (DeepSpeed
    # steps its engine in that backward; DDP with a training vision tower needs the tower in the
    # synchronised backward); the chunks before it go through `partial_backward`
    backward: Callable[[torch.Tensor], None] | None = field(default=lambda loss: loss.backward())
    partial_backward: Callable[[torch.Tensor], None] = field(default=lambda loss: loss.backward())
    no_sync: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)

    def __call__(self, enc: dict[str, torch.Tensor], seqs: list[list[int]], k: int,
                 advantage: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs). Rows are image-major, k samples per image. The returned loss has been
        backwarded already (a plain value) unless `backward` is None."""
        n = len(seqs)
        total_tokens = sum(len(s) for s in seqs)
        grad_vision = vision_trains(self.inner)
        with self.autocast():
            feats = encode_images(self.inner, enc, grad_vision)
        ref_feats = self._reference_features(enc, feats, grad_vision)
        if self.backward is None:
            return self._deferred(enc, seqs, k, advantage, feats, ref_feats, grad_vision, total_tokens)
        leaves = [f.detach().requires_grad_(grad_vision) for f in feats]
        size = self.chunk or n
        bounds = list(range(0, n, size))
        pg_sum = kl_sum = 0.0
        for j, r0 in enumerate(bounds):
            rows = list(range(r0, min(r0 + size, n)))
            sync = contextlib.nullcontext() if j == len(bounds) - 1 else self.no_sync()
            with sync:
                pg, kl = self._chunk_loss(enc, seqs, rows, k, leaves, ref_feats, advantage)
                loss = pg / n + (self.kl_weight * kl / max(total_tokens, 1) if self.kl_weight > 0 else 0.0)
                self.backward(loss)
            pg_sum += float(pg.detach())
            kl_sum += float(kl.detach()) if self.kl_weight > 0 else 0.0
        if grad_vision:  # the tower's backward, once, with the gradients the chunks left on its output
            torch.autograd.backward(feats, [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                                            for leaf in leaves])
        return torch.tensor(self._total(pg_sum, kl_sum, n, total_tokens)), self._logs(pg_sum, kl_sum, n, total_tokens)

    def sequence_logprobs(self, enc: dict[str, torch.Tensor], seqs: list[list[int]], k: int,
                          reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-prob of each sequence, its token count), in one forward with the graph
        (DPO); `reference`: the adapter-off model, no graph. Rows image-major, k per image."""
        ref = contextlib.ExitStack()
        if reference:
            ref.enter_context(torch.no_grad())
            if hasattr(self.inner, "disable_adapter"):
                ref.enter_context(self.inner.disable_adapter())
        with ref:
            with self.autocast():
                feats = encode_images(self.inner, enc, vision_trains(self.inner) and not reference)
            batch, mm = self._inputs(enc, seqs, list(range(len(seqs))), k, feats)
            tok_lp, mask = self._logprobs(self.inner if reference else self.model, batch, mm)
        return sequence_logprob(tok_lp, mask, length_normalize=False), mask.sum(dim=-1)

    def _deferred(self, enc, seqs, k, advantage, feats, ref_feats, grad_vision, total_tokens):
        """DeepSpeed (one engine step per optimizer step) and DDP with a training vision tower
        (the tower must be in the synchronised backward): every chunk but the last is backwarded
        here by `partial_backward` (a non-boundary micro-step: DeepSpeed accumulates, DDP does
        not sync); the last chunk's loss is returned with its graph for the loop's backward, with
        a zero-valued term that carries the earlier chunks' feature gradients through the tower.
        Its value is the whole step's loss (the earlier chunks' part added as a constant)."""
        n = len(seqs)
        size = self.chunk or n
        bounds = list(range(0, n, size))
        leaves = [f.detach().requires_grad_(grad_vision) for f in feats]
        pg_sum = kl_sum = 0.0
        for r0 in bounds[:-1]:
            rows = list(range(r0, min(r0 + size, n)))
            with self.no_sync():
                pg, kl = self._chunk_loss(enc, seqs, rows, k, leaves, ref_feats, advantage)
                self.partial_backward(pg / n + (self.kl_weight * kl / max(total_tokens, 1) if self.kl_weight > 0 else 0.0))
            pg_sum += float(pg.detach())
            kl_sum += float(kl.detach()) if self.kl_weight > 0 else 0.0
        rows = list(range(bounds[-1], n))
        pg, kl = self._chunk_loss(enc, seqs, rows, k, feats, ref_feats, advantage)
        loss = pg / n + (self.kl_weight * kl / max(total_tokens, 1) if self.kl_weight > 0 else 0.0)
        if grad_vision and len(bounds) > 1:
            loss = loss + sum(((f - f.detach()) * leaf.grad).sum() for f, leaf in zip(feats, leaves)
                              if leaf.grad is not None)
        earlier = self._total(pg_sum, kl_sum, n, total_tokens)
        pg_sum += float(pg.detach())
        kl_sum += float(kl.detach()) if self.kl_weight > 0 else 0.0
        return loss + earlier, self._logs(pg_sum, kl_sum, n, total_tokens)

    def _total(self, pg_sum, kl_sum, n, total_tokens) -> float:
        return pg_sum / n + (self.kl_weight * kl_sum / max(total_tokens, 1) if self.kl_weight > 0 else 0.0)

    def _logs(self, pg_sum, kl_sum, n, total_tokens) -> dict[str, float]:
        logs = {"sample_len": total_tokens / max(n, 1), "pg_loss": pg_sum / n}
        if self.kl_weight > 0:
            logs["kl"] = kl_sum / max(total_tokens, 1)
        return logs

    def _inputs(self, enc, seqs, rows, k, feats):
        images = [r // k for r in rows]
        idx = torch.as_tensor(images, device=enc["input_ids"].device)
        prompts = {key: enc[key][idx] for key in ("input_ids", "attention_mask", "mm_token_type_ids") if key in enc}
        batch = with_answers(prompts, [seqs[r] for r in rows], self.pad_id)
        batch.inputs["image_grid_thw"] = enc["image_grid_thw"][idx]
        mm = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats[i] for i in images))}
        return batch, mm

    def _logprobs(self, model, batch, mm):
        a = batch.answer_len
        out = model(**batch.inputs, mm_encoder_outputs=mm, use_cache=False, logits_to_keep=a + 1)
        logits = out.logits[:, :-1].float()
        if self.suppress:
            logits[..., list(self.suppress)] = float("-inf")
        return token_logprobs(logits, batch.labels[:, -a:])

    def _chunk_loss(self, enc, seqs, rows, k, feats, ref_feats, advantage):
        batch, mm = self._inputs(enc, seqs, rows, k, feats)
        tok_lp, mask = self._logprobs(self.model, batch, mm)
        seq_lp = sequence_logprob(tok_lp, mask, self.length_normalize)
        pg = -(advantage[rows].detach() * seq_lp).sum()
        if self.kl_weight <= 0:
            return pg, None
        with torch.no_grad(), self.inner.disable_adapter():
            ref_batch, ref_mm = self._inputs(enc, seqs, rows, k, ref_feats)
            ref_lp, _ = self._logprobs(self.inner, ref_batch, ref_mm)
        return pg, kl_k3_sum(tok_lp, ref_lp, mask)

    def _reference_features(self, enc, feats, grad_vision):
        """The adapter-off model's image features: the same tensors unless the tower has LoRA."""
        if self.kl_weight <= 0 or not grad_vision:
            return [f.detach() for f in feats]
        with torch.no_grad(), self.inner.disable_adapter(), self.autocast():
            return encode_images(self.inner, enc, grad=False)


def policy_logprob(loop, cfg, suppress: Sequence[int]) -> PolicyLogprob:
    """The SCST stage's `PolicyLogprob`, wired to its accelerator (scaling, no_sync, autocast)."""
    from accelerate.utils import DistributedType

    acc = loop.acc
    inner = acc.unwrap_model(loop.model)
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    defer = deepspeed or (acc.num_processes > 1 and vision_trains(inner))
    if deepspeed:  # a micro-step that is not the accumulation boundary: backward, no engine step
        partial = lambda loss: acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=False)  # noqa: E731
        no_sync = contextlib.nullcontext
    else:
        partial, no_sync = acc.backward, lambda: acc.no_sync(loop.model)
    return PolicyLogprob(
        model=loop.model, inner=inner, pad_id=loop.builder.pad_id, suppress=suppress,
        length_normalize=cfg.length_normalize, kl_weight=cfg.kl_weight, chunk=cfg.logprob_chunk,
        backward=None if defer else acc.backward, partial_backward=partial, no_sync=no_sync,
        autocast=acc.autocast)
