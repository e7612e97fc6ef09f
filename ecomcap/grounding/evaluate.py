"""Grounded evaluation with the independent evaluator encoder: can the generated caption find
its own image among the valid images (caption->image Recall@K), and how well does it fit it
(CLIP-S)? The evaluator is trained apart from the reward's scorer, so a model cannot score well
here by fooling the encoder it was optimised against."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ecomcap.grounding.scorer import GroundingScorer, clip_s
from ecomcap.training.data import ShardImages

BATCH = 256  # images decoded and embedded at a time


def caption_to_image_ranks(text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
    """0-based rank of each caption's own image (row i <-> image i): the other images scoring at
    least as high (a tie is a miss, as in the probe: an encoder that cannot tell is not credited)."""
    sims = text_emb @ image_emb.T
    own = sims[np.arange(len(sims)), np.arange(len(sims))]
    return (sims >= own[:, None]).sum(axis=1) - 1


def grounded_metrics(preds: Mapping[str, str], valid_dir: str | Path, evaluator: GroundingScorer) -> dict[str, float]:
    """{"cap2img_R1", "cap2img_R5", "clip_s_eval", "n_grounded"} of the captions of the valid images."""
    data = ShardImages(valid_dir)
    rows = [r for r, i in enumerate(data.ids) if i in preds]
    if not rows:
        return {}
    image_emb = np.concatenate([evaluator.images([data.image(r) for r in rows[i:i + BATCH]])
                                for i in range(0, len(rows), BATCH)])
    text_emb = evaluator.texts([preds[data.ids[r]] for r in rows])
    ranks = caption_to_image_ranks(text_emb, image_emb)
    return {"cap2img_R1": float((ranks < 1).mean()), "cap2img_R5": float((ranks < 5).mean()),
            "clip_s_eval": float(clip_s(image_emb, text_emb, evaluator.w).mean()), "n_grounded": len(rows)}
