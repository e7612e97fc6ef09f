"""Caption metrics on the shared tokeniser, equal to pycocoevalcap's and much faster.

- `evaluate` / `evaluate_files`: CIDEr-D, BLEU-4, ROUGE-L for a validation run.
- `cider_d`, `bleu`, `rouge_l`: one metric each -> (corpus score, per-image scores).
- `CiderD`: CIDEr-D with document frequencies fixed by a training corpus (the SCST reward,
  `ecomcap.training.rewards.CaptionReward`, is built on it).
"""
from ecomcap.metrics.bleu import bleu
from ecomcap.metrics.cider import CiderD, cider_d
from ecomcap.metrics.evaluate import evaluate, evaluate_files, read_predictions, read_references
from ecomcap.metrics.rouge import rouge_l

__all__ = [
    "CiderD",
    "bleu",
    "cider_d",
    "evaluate",
    "evaluate_files",
    "read_predictions",
    "read_references",
    "rouge_l",
]
