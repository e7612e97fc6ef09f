"""Paired bootstrap of a relative gain: is the candidate better than the champion beyond noise?

Both models are scored on the same items (images, queries). Resampling the items with
replacement and recomputing mean(candidate) / mean(champion) - 1 on each resample gives the
distribution of the relative gain that a different draw of the evaluation set would show; the
gate promotes only when the lower end of its confidence interval clears `min_rel_gain`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class GainInterval:
    """Relative gain of the primary metric (0.05 = +5%) with its two-sided interval."""

    gain: float
    low: float
    high: float
    confidence: float
    resamples: int
    items: int

    def text(self) -> str:
        return (f"relative gain {self.gain:+.2%}, {self.confidence:.0%} interval "
                f"[{self.low:+.2%}, {self.high:+.2%}] ({self.resamples} paired resamples of {self.items} items)")


def _rel(c: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Ratio of means minus one, row-wise; a zero champion mean counts as +inf (or 0 when equal)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = c / h - 1.0
    out = np.where(h == 0, np.where(c > 0, np.inf, 0.0), out)
    return out


def paired_relative_gain(candidate: Mapping[str, float], champion: Mapping[str, float], *,
                         confidence: float = 0.9, resamples: int = 1000, seed: int = 0) -> GainInterval:
    """Bootstrap interval of mean(candidate)/mean(champion) - 1 over the items both scored.

    Raises ValueError when the two score sets do not cover the same items (not comparable).
    """
    ids = sorted(candidate)
    if set(ids) != set(champion):
        only_c = len(set(candidate) - set(champion))
        only_h = len(set(champion) - set(candidate))
        raise ValueError(f"per-item scores cover different items ({only_c} only in the candidate's, "
                         f"{only_h} only in the champion's)")
    if not ids:
        raise ValueError("no per-item scores to compare")
    c = np.array([candidate[i] for i in ids], dtype=np.float64)
    h = np.array([champion[i] for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(resamples, len(ids)))
    gains = _rel(c[idx].mean(axis=1), h[idx].mean(axis=1))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(gains, [tail, 1.0 - tail], method="nearest")  # no inf - inf
    point = float(_rel(np.array([c.mean()]), np.array([h.mean()]))[0])
    return GainInterval(point, float(low), float(high), confidence, resamples, len(ids))
