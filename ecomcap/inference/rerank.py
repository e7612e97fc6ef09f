"""Generation-time reranking: N beam candidates per image rescored by their length-normalised
log-probability under the captioner plus μ·CLIP-S from the grounding scorer (`generate.rerank`).

Beam search keeps the likeliest captions; among them, the one the scorer finds truest to the
image wins unless it is much less likely. The log-probability is recomputed in one teacher-forced
forward (the fast decode loop returns token ids, not scores), with the same suppressed tokens
masked as in decoding.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ecomcap.config import GenerateConfig
from ecomcap.errors import EcomcapError
from ecomcap.training.collate import answer_logits, repeat_prompts, with_answers
from ecomcap.training.losses import sequence_logprob, token_logprobs


@torch.no_grad()
def candidate_logprobs(model, enc: dict[str, torch.Tensor], seqs: Sequence[Sequence[int]], n: int, pad_id: int,
                       suppress: Sequence[int] = ()) -> np.ndarray:
    """Length-normalised log p(candidate | image, prompt) of `n` candidates per prompt row."""
    batch = with_answers(repeat_prompts(enc, n), seqs, pad_id)
    logits, targets = answer_logits(model, batch, suppress)
    lp, mask = token_logprobs(logits, targets)
    return sequence_logprob(lp, mask, length_normalize=True).float().cpu().numpy()


@lru_cache(maxsize=2)
def load_scorer(path: str, device: str | None):
    """One grounding scorer per process (generation calls this per batch); it keeps to its own
    probe (blind to attributes below the threshold it was built with) and its recorded CLIP-S w."""
    from ecomcap.grounding.scorer import GroundingScorer

    return GroundingScorer(path, device=device)


def pick(logprob: np.ndarray, clip: np.ndarray, n: int, weight: float) -> np.ndarray:
    """Index (within each image's n candidates) of the best logprob + weight·CLIP-S."""
    return (logprob + weight * clip).reshape(-1, n).argmax(axis=1)


def rerank(texts: Sequence[str], logprob: np.ndarray, images: Sequence[Image.Image], n: int, weight: float,
           scorer) -> list[str]:
    """The chosen caption per image from `n` consecutive candidates each."""
    clip = scorer.clip_s(scorer.images(list(images)), list(texts), np.arange(len(texts)) // n)
    best = pick(logprob, clip, n, weight)
    return [texts[i * n + j] for i, j in enumerate(best)]


SCORER_DIR = "grounding_scorer"  # where an exported model keeps its reranker's scorer


def resolve_scorer(scorer_dir: str | None, model_dir: str | Path | None) -> str | None:
    """A scorer path as recorded (absolute, or relative to the model directory that ships it),
    else the model directory's own shipped scorer."""
    if scorer_dir and (Path(scorer_dir).is_absolute() or model_dir is None):
        return scorer_dir
    shipped = Path(model_dir) / (scorer_dir or SCORER_DIR) if model_dir is not None else None
    if shipped is not None and shipped.is_dir():
        return str(shipped)
    return scorer_dir


def with_scorer(cfg: GenerateConfig, model_dir: str | Path | None) -> GenerateConfig:
    """`cfg` with its reranker's scorer resolved against `model_dir` and checked before any model
    loads (no-op when reranking is off)."""
    if not cfg.rerank.candidates:
        return cfg
    path = scorer_path(resolve_scorer(cfg.rerank.scorer_dir, model_dir))
    return cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"scorer_dir": path})})


def with_grounding_scorer(cfg: GenerateConfig, grounding: str | Path | None) -> GenerateConfig:
    """`cfg` with the reranker pointed at a grounding stage output's scorer (when reranking is on)."""
    if grounding is None or not cfg.rerank.candidates:
        return cfg
    return cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"scorer_dir": str(Path(grounding) / "scorer")})})


def scorer_fingerprint(path: str | Path | None) -> str | None:
    """The scorer's identity by content (its recorded fingerprint), not by where a pod downloaded it:
    fan-out pods and the merge must agree on the key of the generated parts."""
    if not path:
        return None
    import json

    quality = Path(path) / "grounding.json"
    if quality.is_file():
        return json.loads(quality.read_text(encoding="utf-8")).get("fingerprint")
    from ecomcap.grounding.scorer import weights_fingerprint

    return weights_fingerprint(path)


def scorer_path(path: str | Path | None) -> str:
    if path is None or not Path(path).is_dir():
        raise EcomcapError(f"generate.rerank.candidates is set but its grounding scorer is missing ({path}): run the "
                           "training pipeline with grounding.enabled, or use a model exported with reranking (it "
                           f"ships {SCORER_DIR}/), or set generate.rerank.candidates: 0")
    return str(path)
