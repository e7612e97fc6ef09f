"""One evaluation summary for a set of captions: the metrics plus degeneration signals.

CIDEr-D / BLEU-4 / ROUGE-L, the number of distinct captions, the mean share of repeated 3-grams
(looping), mean length, the share of the most common opener, and attribute accuracy where
ground truth exists (synthetic data).
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from ecomcap.data.clean import repeated_ngram_share
from ecomcap.metrics.attributes import attribute_accuracy
from ecomcap.metrics.brands import brand_accuracy, brands_from_references
from ecomcap.metrics.evaluate import evaluate
from ecomcap.text import tokenize_many


def caption_report(
    preds: Mapping[str, str],
    refs: Mapping[str, Sequence[str]],
    attrs: Mapping[str, dict] | None = None,
    brand_train_counts: Mapping[str, int] | None = None,
    brands: Sequence[str] = (),
) -> dict:
    """Metrics on pycocoevalcap's raw scale plus diversity/degeneration figures; with attribute
    ground truth, attribute accuracy; brand recognition (frequent/rare by `brand_train_counts`, the
    training images per brand) against the ground truth, else - given a brand lexicon `brands` -
    against the brand each image's references name."""
    scored = {k: preds.get(k, "") for k in refs}
    out = evaluate(scored, refs, per_image=True)
    out["per_image"] = {k: {m: v[m] for m in ("CIDEr-D", "ROUGE-L")} for k, v in out["per_image"].items()}
    toks = tokenize_many(list(scored.values()))
    out["distinct"] = len(set(scored.values()))
    out["repeat_ngram"] = sum(repeated_ngram_share(t, 3) for t in toks) / max(len(toks), 1)
    out["mean_len"] = sum(map(len, toks)) / max(len(toks), 1)
    out["top_opener_share"] = top_opener_share(toks)
    if attrs is not None:
        out["attributes"] = attribute_accuracy(scored, attrs)
        out["attr_mean"] = out["attributes"]["mean"]  # a top-level figure the gate can guard
    if attrs is not None or brands:
        out["brands"] = brand_accuracy(scored, brands_from_references(refs, brands, attrs), brand_train_counts)
    return out


def top_opener_share(tokens: Sequence[Sequence[str]], n: int = 2) -> float:
    """Share of captions that open with the most common first `n` tokens ("这款…" everywhere:
    the consensus phrasing CIDEr-D optimisation drifts to)."""
    openers = Counter(tuple(t[:n]) for t in tokens if t)
    return openers.most_common(1)[0][1] / len(tokens) if openers else 0.0
