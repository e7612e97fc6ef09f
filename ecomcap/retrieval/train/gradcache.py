"""Gradient caching (Gao et al. 2021): a contrastive loss over a large batch in small memory.

1. Embed every chunk without building a graph (remembering each chunk's RNG state).
2. Compute the loss on the detached embeddings; back-propagate to get d loss / d embedding.
3. Re-embed chunk by chunk with a graph (same RNG state, so dropout matches) and
   back-propagate embedding . cached-gradient.
The parameter gradients equal those of the one-shot loss, up to float rounding.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

Inputs = dict[str, torch.Tensor]
Tower = tuple[Callable[[Inputs], torch.Tensor], Inputs]


def _chunks(inputs: Inputs, size: int) -> list[Inputs]:
    n = next(iter(inputs.values())).shape[0]
    return [{k: v[i:i + size] for k, v in inputs.items()} for i in range(0, n, size)]


class RandState:
    """The CPU RNG plus the RNG of every accelerator the inputs live on (as GradCache's
    RandContext and torch.utils.checkpoint do): on CUDA dropout draws from the device RNG, so
    restoring only the CPU state would re-forward with different masks."""

    def __init__(self, inputs: Inputs):
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*inputs.values())

    def replay(self):
        """Context manager: run with these states, then put the RNGs back as they were."""
        return _Replay(self)


class _Replay:
    def __init__(self, state: RandState):
        self.state = state

    def __enter__(self):
        self.fork = torch.random.fork_rng(devices=self.state.devices)
        self.fork.__enter__()
        torch.set_rng_state(self.state.cpu)
        set_device_states(self.state.devices, self.state.states)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


def grad_cache_backward(towers: list[Tower], loss_fn: Callable[..., tuple[torch.Tensor, dict]], chunk: int,
                        backward: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Back-propagate loss_fn(*[tower embeddings]) chunk by chunk; returns (detached loss, extras).

    `backward` runs the loss backward (e.g. `accelerator.backward` for loss scaling); the
    surrogate products use plain `.backward()` since their upstream gradient is already scaled.
    """
    backward = backward or (lambda t: t.backward())
    cached, states, parts = [], [], []
    for fn, inputs in towers:
        pieces, rng = _chunks(inputs, chunk), []
        embs = []
        for piece in pieces:
            rng.append(RandState(piece))
            with torch.no_grad():
                embs.append(fn(piece))
        cached.append(torch.cat(embs).detach().requires_grad_())
        states.append(rng)
        parts.append(pieces)
    loss, extra = loss_fn(*cached)
    backward(loss)
    for (fn, _), rep, rng, pieces in zip(towers, cached, states, parts):
        grads = rep.grad.split(chunk)
        for piece, state, grad in zip(pieces, rng, grads):
            with state.replay():
                emb = fn(piece)
            (emb * grad).sum().backward()
    return loss.detach(), extra
