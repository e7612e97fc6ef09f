"""The active stack's experiment tracker name (None without one): steps log to MLflow through it."""
from __future__ import annotations


def tracker_name() -> str | None:
    try:
        from zenml.client import Client

        tracker = Client().active_stack.experiment_tracker
        return tracker.name if tracker else None
    except Exception:  # no ZenML store configured yet: run untracked
        return None


TRACKER = tracker_name()


def run_name() -> str:
    from zenml import get_step_context

    return get_step_context().pipeline_run.name
