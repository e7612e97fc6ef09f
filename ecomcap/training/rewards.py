"""SCST reward: CIDEr-D of sampled captions against the image's references, document
frequencies fixed by the training references (computed once), EOS counted as a token.

Kept apart from the loss (as self-critical.pytorch does). Counting EOS means a caption that
stops where references stop earns the final "... EOS" n-grams, and one cut off at the length
limit does not, which discourages rambling.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ecomcap.config_encoders import RewardConfig
from ecomcap.data.clean import repeated_ngram_share
from ecomcap.metrics.cider import CiderD, leave_one_out_baseline
from ecomcap.text import tokenize_many

if TYPE_CHECKING:
    from PIL import Image

    from ecomcap.grounding.scorer import GroundingScorer

EOS_WORD = " eosmark"  # an ASCII run: one metric token, never produced by the caption tokeniser's text


class CaptionReward:
    """Scores samples per image id; baseline = mean of the image's other samples, or greedy."""

    def __init__(self, references: Mapping[str, Sequence[str]]):
        self.scorer = CiderD({k: [r + EOS_WORD for r in refs] for k, refs in references.items()})

    def scores(self, captions: Sequence[str], ended: Sequence[bool], ids: Sequence[str]) -> np.ndarray:
        texts = [c + EOS_WORD if e else c for c, e in zip(captions, ended)]
        return self.scorer.score_ids(texts, list(ids))


class CombinedReward:
    """cider·CIDEr-D + clip·CLIP-S + distinct·distinctiveness - repeat·(repeated 3-gram share).

    Returns the total and every weighted-in term apart (logged per step), so a rise in the total
    can be traced to what earned it. Images are embedded once per call, not once per sample.
    """

    def __init__(self, references: Mapping[str, Sequence[str]], weights: RewardConfig,
                 scorer: "GroundingScorer | None" = None):
        if weights.needs_scorer and scorer is None:
            raise ValueError("the CLIP-S / distinctiveness reward terms need a grounding scorer")
        self.weights, self.scorer = weights, scorer
        self.cider = CaptionReward(references) if weights.cider > 0 else None

    def __call__(self, captions: Sequence[str], ended: Sequence[bool], ids: Sequence[str],
                 images: "Sequence[Image.Image] | None" = None, owner: Sequence[int] | None = None,
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        w, terms = self.weights, {}
        if self.cider is not None:
            terms["cider"] = self.cider.scores(captions, ended, ids)
        if self.scorer is not None and w.needs_scorer:
            from ecomcap.grounding.scorer import clip_s, distinctiveness

            owner = np.arange(len(captions)) if owner is None else np.asarray(owner)
            img, txt = self.scorer.images(list(images or [])), self.scorer.texts(captions)
            if w.clip > 0:
                terms["clip_s"] = clip_s(img[owner], txt, self.scorer.w)
            if w.distinct > 0:
                terms["distinct"] = distinctiveness(img, txt, owner, self.scorer.scale)
        if w.repeat > 0:
            terms["repeat"] = np.array([repeated_ngram_share(t, 3) for t in tokenize_many(captions)])
        weight = {"cider": w.cider, "clip_s": w.clip, "distinct": w.distinct, "repeat": -w.repeat}
        total = sum((weight[k] * v for k, v in terms.items()), np.zeros(len(captions)))
        return total, terms


def mean_of_others(scores: np.ndarray, k: int) -> np.ndarray:
    """Baseline per sample: the mean reward of the other k-1 samples of the same image
    (samples come image by image, k at a time)."""
    return leave_one_out_baseline(scores, np.arange(len(scores)) // k)


def greedy_baseline(greedy_scores: np.ndarray, k: int) -> np.ndarray:
    """Baseline per sample: its image's greedy caption reward (Rennie et al., 2017)."""
    return np.repeat(greedy_scores, k)
