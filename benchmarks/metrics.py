"""Benchmark: ecomcap.metrics vs pycocoevalcap on a seeded synthetic MUGE-sized validation set.

Run from the repo root: ``python benchmarks/metrics.py`` (needs the dev extra: pycocoevalcap).
Both sides start from raw captions: ours tokenises with the vectorised tokeniser inside
`evaluate`, the pycocoevalcap side with the per-text one (same tokens), then scores CIDEr-D +
BLEU-4 + ROUGE-L on the space-joined tokens. "Scoring alone" subtracts from each side the time
of the tokeniser that side uses. Also times the SCST reward:
`CiderD.score_ids` (df cached from the corpus) vs pycocoevalcap's CiderScorer rebuilt per
batch (its df comes from the batch's refs, so the values differ by design; only time counts).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ecomcap.metrics import CiderD, evaluate
from ecomcap.text import tokenize_joined, tokenize_many

ASCII_WORDS = ["xl", "xxl", "2024", "5g", "led", "usb", "ins", "diy", "100ml", "3d", "s925", "m"]
PUNCT = ["，", "！", "。", "、", " "]


class CaptionMaker:
    """Seeded Chinese product captions: each image has a few phrases its captions share."""

    def __init__(self, seed: int, n_chars: int = 300):
        self.rng = random.Random(seed)
        # a few hundred "common" CJK characters, Zipf-ish frequencies
        self.chars = [chr(0x4E00 + self.rng.randrange(0x5000)) for _ in range(n_chars)]
        self.weights = [1.0 / (i + 1) ** 0.7 for i in range(n_chars)]

    def _chars(self, n: int) -> str:
        return "".join(self.rng.choices(self.chars, self.weights, k=n))

    def phrases(self) -> list[str]:
        return [self._chars(self.rng.randint(2, 5)) for _ in range(self.rng.randint(3, 6))]

    def caption(self, phrases: list[str]) -> str:
        """10-30 characters: some of the image's phrases, filler, maybe an ASCII word."""
        target = self.rng.randint(10, 30)
        parts = self.rng.sample(phrases, self.rng.randint(2, len(phrases)))
        if self.rng.random() < 0.3:
            parts.insert(self.rng.randrange(len(parts) + 1), self.rng.choice(ASCII_WORDS))
        text = self.rng.choice(PUNCT[:2] + [""]).join(parts)
        while len(text) < target:
            text += self.rng.choice(PUNCT[:2] + [""]) + self._chars(self.rng.randint(2, 6))
        return text[:target]


def make_data(n_images: int, n_refs: int, seed: int = 0):
    maker = CaptionMaker(seed)
    phrases = {f"img{i:05d}": maker.phrases() for i in range(n_images)}
    refs = {k: [maker.caption(p) for _ in range(n_refs)] for k, p in phrases.items()}
    preds = {k: maker.caption(p) for k, p in phrases.items()}
    return maker, phrases, refs, preds


def pycoco_scores(preds, refs):
    """pycocoevalcap CIDEr-D, BLEU-4, ROUGE-L from raw captions (tokenising first)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {k: [tokenize_joined(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize_joined(preds[k])] for k in refs}
    cider, cider_img = Cider().compute_score(gts, res)
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, bleu_img = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_img = Rouge().compute_score(gts, res)
    return {
        "CIDEr-D": (cider, np.asarray(cider_img)),
        "BLEU-4": (bleu[3], np.asarray(bleu_img[3])),
        "ROUGE-L": (rouge, np.asarray(rouge_img)),
    }


def scoring_speedup(theirs_s: float, their_tok_s: float, ours_s: float, our_tok_s: float) -> float:
    """Speed-up of scoring alone: each side minus the time of the tokeniser that side uses."""
    return (theirs_s - their_tok_s) / max(ours_s - our_tok_s, 1e-9)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_evaluate(preds, refs, repeats: int):
    """Median of `repeats` runs of ours (the machine may be shared); one of pycocoevalcap."""
    runs = [timed(evaluate, preds, refs, True) for _ in range(repeats)]
    ours, ours_s = runs[0][0], statistics.median(t for _, t in runs)
    print("ours, each run (s):", " ".join(f"{t:.3f}" for _, t in runs))
    theirs, theirs_s = timed(pycoco_scores, preds, refs)
    keys = list(refs)
    diff = {}
    for metric, (corpus, per_image) in theirs.items():
        mine = np.array([ours["per_image"][k][metric] for k in keys])
        diff[metric] = max(abs(ours[metric] - corpus), float(np.abs(mine - per_image).max()))
    return ours, ours_s, theirs, theirs_s, diff


def bench_reward(maker, phrases, refs, n_batches: int, batch_images: int, samples: int):
    """Mean seconds per SCST batch: CiderD.score_ids vs a fresh CiderScorer per batch."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer, build_s = timed(CiderD, refs)
    joined = {k: [tokenize_joined(r) for r in v] for k, v in refs.items()}
    keys = list(refs)
    batches = []
    for _ in range(n_batches):
        ids = [k for k in maker.rng.sample(keys, batch_images) for _ in range(samples)]
        batches.append(([maker.caption(phrases[k]) for k in ids], ids))

    def pycoco_batch(cands, ids):
        cs = CiderScorer(n=4, sigma=6.0)
        for cand, key in zip(cands, ids):
            cs += (tokenize_joined(cand), joined[key])
        return cs.compute_score()

    ours = [timed(scorer.score_ids, *b)[1] for b in batches]
    theirs = [timed(pycoco_batch, *b)[1] for b in batches]
    return build_s, float(np.mean(ours)), float(np.mean(theirs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="runs of ours (median)")
    ap.add_argument("--reward-batches", type=int, default=20)
    ap.add_argument("--batch-images", type=int, default=64)
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args(argv)

    maker, phrases, refs, preds = make_data(args.images, args.refs)
    texts = [r for v in refs.values() for r in v] + list(preds.values())
    # each side's own tokenising: pycocoevalcap gets the per-text tokeniser, ours is vectorised
    tokenize_many(["预热"])  # its code-point class table is built once per process
    _, their_tok_s = timed(lambda: [tokenize_joined(t) for t in texts])
    _, our_tok_s = timed(tokenize_many, texts)
    ours, ours_s, theirs, theirs_s, diff = bench_evaluate(preds, refs, args.repeats)
    build_s, reward_s, pyc_reward_s = bench_reward(
        maker, phrases, refs, args.reward_batches, args.batch_images, args.samples
    )

    print(f"{args.images} images x {args.refs} refs (from raw text, tokenising included)")
    print(f"{'metric':<10} {'ours':>10} {'pycocoevalcap':>14} {'max |diff|':>11}")
    for m in ("CIDEr-D", "BLEU-4", "ROUGE-L"):
        print(f"{m:<10} {ours[m]:>10.6f} {theirs[m][0]:>14.6f} {diff[m]:>11.2e}")
    print(f"{'time (s)':<10} {ours_s:>10.3f} {theirs_s:>14.3f}   speedup {theirs_s / ours_s:.1f}x")
    scoring = scoring_speedup(theirs_s, their_tok_s, ours_s, our_tok_s)
    print(f"(tokenising: ours {our_tok_s:.3f} s vectorised, pycocoevalcap side {their_tok_s:.3f} s per text; "
          f"scoring alone: {scoring:.1f}x)")
    print(f"reward: {args.batch_images} images x {args.samples} samples, "
          f"{args.reward_batches} batches; CiderD built in {build_s:.2f} s")
    print(f"{'ms/batch':<10} {reward_s * 1e3:>10.2f} {pyc_reward_s * 1e3:>14.2f}   "
          f"speedup {pyc_reward_s / reward_s:.1f}x")
    print(json.dumps({
        "bench": "metrics",
        "images": args.images,
        "refs_per_image": args.refs,
        "ours_s": round(ours_s, 4),
        "pycocoevalcap_s": round(theirs_s, 4),
        "speedup": round(theirs_s / ours_s, 1),
        "ours_tokenize_s": round(our_tok_s, 4),
        "pycocoevalcap_tokenize_s": round(their_tok_s, 4),
        "scoring_speedup": round(scoring, 1),
        "max_abs_diff": {m: float(f"{d:.3g}") for m, d in diff.items()},
        "scores": {m: round(ours[m], 6) for m in ("CIDEr-D", "BLEU-4", "ROUGE-L")},
        "reward_batch": f"{args.batch_images}x{args.samples}",
        "reward_ms": round(reward_s * 1e3, 3),
        "pycocoevalcap_reward_ms": round(pyc_reward_s * 1e3, 2),
        "reward_speedup": round(pyc_reward_s / reward_s, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
