"""SCST reward: CIDEr-D of sampled captions against the image's references, document
frequencies fixed by the training references (computed once), EOS counted as a token.

Kept apart from the loss (as self-critical.pytorch does). Counting EOS means a caption that
stops where references stop earns the final "... EOS" n-grams, and one cut off at the length
limit does not, which discourages rambling.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ecomcap.metrics.cider import CiderD, leave_one_out_baseline

EOS_WORD = " eosmark"  # an ASCII run: one metric token, never produced by the caption tokeniser's text


class CaptionReward:
    """Scores samples per image id; baseline = mean of the image's other samples, or greedy."""

    def __init__(self, references: Mapping[str, Sequence[str]]):
        self.scorer = CiderD({k: [r + EOS_WORD for r in refs] for k, refs in references.items()})

    def scores(self, captions: Sequence[str], ended: Sequence[bool], ids: Sequence[str]) -> np.ndarray:
        texts = [c + EOS_WORD if e else c for c, e in zip(captions, ended)]
        return self.scorer.score_ids(texts, list(ids))


def mean_of_others(scores: np.ndarray, k: int) -> np.ndarray:
    """Baseline per sample: the mean reward of the other k-1 samples of the same image
    (samples come image by image, k at a time)."""
    return leave_one_out_baseline(scores, np.arange(len(scores)) // k)


def greedy_baseline(greedy_scores: np.ndarray, k: int) -> np.ndarray:
    """Baseline per sample: its image's greedy caption reward (Rennie et al., 2017)."""
    return np.repeat(greedy_scores, k)
