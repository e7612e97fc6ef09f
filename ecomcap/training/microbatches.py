"""The training data path that overlaps the accelerator: processed micro-batches from a DataLoader.

A stage's micro-batch is a pure function of its index (`step * grad_accum + micro`: the epoch
order is seeded, each rank takes its slice), so the CPU work (JPEG decode, resize, normalise,
patchify, chat template, answer tokens) can run ahead in worker processes while the GPU trains on
the previous batch. The batches are exactly the ones the stage would build inline, in the same
order; resume starts the index range at the resumed step. Workers get one thread each (the
processor's numpy/torch work would otherwise oversubscribe the cores) and pinned memory on CUDA,
so the copy to the device can be non-blocking.

A stage opts in by giving its step function a `prepare(examples) -> batch` (CPU); the loop then
calls the step function with prepared batches instead of examples.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class MicroBatches(Dataset):
    """Index k -> `prepare(examples_for(step, micro))` with (step, micro) = divmod(k, grad_accum)."""

    def __init__(self, examples_for: Callable[[int, int], list], prepare: Callable[[list], Any], grad_accum: int,
                 total: int):
        self.examples_for, self.prepare, self.grad_accum, self.total = examples_for, prepare, grad_accum, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, k: int):
        return self.prepare(self.examples_for(*divmod(k, self.grad_accum)))


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def micro_batches(dataset: MicroBatches, first: int, workers: int, pin: bool, prefetch: int = 4) -> Iterator:
    """Batches `first`, `first + 1`, ... of `dataset`, in order; `workers` 0 builds them inline."""
    if workers == 0:
        return (dataset[k] for k in range(first, len(dataset)))
    loader = DataLoader(dataset, batch_size=None, sampler=range(first, len(dataset)), num_workers=workers,
                        pin_memory=pin, prefetch_factor=prefetch, worker_init_fn=_one_thread,
                        persistent_workers=False)
    return iter(loader)


def data_workers(cfg, acc) -> int:
    """The loop config's `data_workers`, or the default for this process's device."""
    import os

    here = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))  # this machine's ranks, not all nodes'
    return cfg.data_workers if cfg.data_workers is not None else default_workers(acc.device, here)


def default_workers(device: torch.device, processes: int) -> int:
    """`data_workers: null`: none on CPU (the cores train), else up to 4 per process on the machine's cores."""
    if device.type == "cpu":
        return 0
    from ecomcap.processes import (
        available_cpus,  # the pod's share (affinity, cgroup quota), not the node's
    )

    return max(1, min(4, available_cpus() // max(1, processes) - 1))
