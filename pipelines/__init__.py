"""ZenML pipelines: `training_pipeline`, `batch_inference_pipeline`, `retrieval_pipeline` (thin wiring
of `steps`).

A user-fixable problem found while a pipeline compiles (a config mistake, a refused combination)
ends `zenml pipeline run` with its one-line message as the last line, not under a rich traceback
whose last line is ZenML's wrapper. Failures inside steps are ZenML's to report (RuntimeError)."""
from __future__ import annotations

import sys

from ecomcap.errors import EcomcapError


def _one_line(previous):
    def excepthook(kind, exc, tb):
        if isinstance(exc, EcomcapError):
            print(f"Error: {exc}", file=sys.stderr, flush=True)
            return
        previous(kind, exc, tb)

    excepthook.ecomcap = True
    return excepthook


if not getattr(sys.excepthook, "ecomcap", False):
    sys.excepthook = _one_line(sys.excepthook)
