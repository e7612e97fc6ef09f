"""Functions `ecomcap.launch` runs in its processes during tests/test_launch.py (not tests)."""
import os
from pathlib import Path


def report(out: str, value: int) -> dict:
    """Each rank leaves a file; rank 0's return value is what the launcher hands back."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    Path(out, f"rank{rank}.txt").write_text(f"{world}\n")
    return {"rank": rank, "world": world, "value": value * 2}


def fail_on_rank(rank: int) -> dict:
    if int(os.environ.get("RANK", "0")) == rank:
        raise RuntimeError(f"boom on rank {rank}")
    return {}


def clear_error() -> dict:
    from ecomcap.errors import EcomcapError

    raise EcomcapError("the data has no train split")


def log_metric(name: str) -> dict:
    from ecomcap.registry import tracking

    tracking.log_metrics({name: 1.5})
    return {"active": tracking.active()}


def group_timeout_after_accelerator(minutes: int) -> dict:
    """A process group started earlier (a bare `PartialState()`, the default timeout), then the
    training Accelerator: the group must end up with the run config's timeout."""
    from accelerate import PartialState

    from ecomcap.config import LoopConfig
    from ecomcap.training.accelerator import group_timeout, make_accelerator

    PartialState()
    before = group_timeout().total_seconds()
    make_accelerator(LoopConfig(dist_timeout_min=minutes))
    return {"before_s": before, "after_s": group_timeout().total_seconds()}
