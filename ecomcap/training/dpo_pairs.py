"""DPO pairs: which of an image's own sampled captions is chosen and which rejected; user pairs.

Per training image, K sampled captions, each with its combined reward, whether it ended, whether
it loops, and which known attributes it gets wrong:

- chosen: the highest reward among the samples that ended, do not loop and get every known
  attribute right; when none does, a reference that names them all (`chosen_fallback`);
- rejected, first that applies: the best-scoring sample with a wrong attribute (a fluent caption
  that is wrong is exactly what must be unlearnt), a looping or unfinished sample, the lowest
  reward when it trails the chosen by `min_reward_gap` (a generic caption), else (`swap_rejected`)
  the chosen with one attribute swapped (wrong by construction).

"Known attributes": the ground truth where the data has it (the synthetic set), else, per field
of the attribute vocabulary, the one value the image's references agree on.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ecomcap.errors import EcomcapError
from ecomcap.metrics.attributes import FIELDS, attribute_checks
from ecomcap.retrieval.data.swaps import AttributeSwapper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One sampled caption of an image, as the pair picker sees it."""

    text: str
    reward: float
    ended: bool = True
    loop: bool = False
    wrong: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pair:
    """One preference: `reason` says why `rejected` lost (wrong:<field>, loop, unfinished, generic,
    swap:<field>, user); `source` where `chosen` came from (sample, reference, user); `ref_*`: the
    starting policy's log-probs, filled in once the pairs are built."""

    image_id: str
    chosen: str
    rejected: str
    reason: str
    source: str
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    rejected_ended: bool = True  # False: a sample cut at the length limit, scored without an EOS it never had


def known_attributes(references: Sequence[str], swapper: AttributeSwapper,
                     truth: Mapping | None = None) -> dict[str, str]:
    """field -> value: the ground truth when given, else the one value of a field that every
    reference naming the field names alone (a "黑色白色拼接" product has no single known colour)."""
    if truth is not None:
        return {f: truth[f] for f in FIELDS if truth.get(f)}
    named: dict[str, list[set[str]]] = {}
    for ref in references:
        for f, words in swapper.mentioned(ref).items():
            named.setdefault(f, []).append(words)
    return {f: next(iter(sets[0])) for f, sets in named.items() if all(ws == sets[0] for ws in sets)
            and len(sets[0]) == 1}


def named_words(references: Sequence[str], swapper: AttributeSwapper) -> dict[str, set[str]]:
    """field -> every word of it some reference names (words a caption may use without contradicting)."""
    out: dict[str, set[str]] = {}
    for ref in references:
        for f, words in swapper.mentioned(ref).items():
            out.setdefault(f, set()).update(w.lower() for w in words)
    return out


def wrong_fields(caption: str, known: Mapping[str, str], swapper: AttributeSwapper | None = None,
                 allowed: Mapping[str, set[str]] | None = None) -> tuple[str, ...]:
    """The known attributes the caption does not name (the synthetic set's 纯色 rule when it applies)
    or contradicts: names another value of the field too ("黑色…蓝色鞋子" is not right about colour),
    unless it is one of `allowed` (words the image's own references use)."""
    if all(f in known for f in ("category", "colour", "pattern")):
        checks = attribute_checks(caption, known)
    else:
        checks = {f: v.lower() in caption.lower() for f, v in known.items()}
    if swapper is not None:
        for f, words in swapper.mentioned(caption).items():
            ok = {known.get(f, "").lower(), *(allowed or {}).get(f, ())}
            if f in known and any(w.lower() not in ok for w in words):
                checks[f] = False
    return tuple(f for f, ok in checks.items() if not ok)


def choose_pair(image_id: str, cands: Sequence[Candidate], references: Sequence[str], known: Mapping[str, str],
                swapper: AttributeSwapper, rng: random.Random, *, chosen_fallback: str = "reference",
                min_reward_gap: float = 0.3, swap_rejected: bool = True) -> Pair | None:
    """The image's pair, or None when it has no chosen or no rejected caption (see the module doc)."""
    good = [c for c in cands if c.ended and not c.loop and not c.wrong]
    if good:
        best = max(good, key=lambda c: c.reward)
        chosen, source, chosen_reward = best.text, "sample", best.reward
    else:
        allowed = named_words(references, swapper)
        right = [r for r in references if not wrong_fields(r, known, swapper, allowed)] if chosen_fallback == "reference" else []
        if not right:
            return None
        chosen, source, chosen_reward = right[0], "reference", None
    others = [c for c in cands if c.text != chosen]
    wrong = [c for c in others if c.wrong]
    if wrong:
        worst = max(wrong, key=lambda c: c.reward)
        return Pair(image_id, chosen, worst.text, "wrong:" + worst.wrong[0], source, rejected_ended=worst.ended)
    broken = [c for c in others if c.loop or not c.ended]
    if broken:
        pick = max(broken, key=lambda c: c.reward)
        return Pair(image_id, chosen, pick.text, "loop" if pick.loop else "unfinished", source,
                    rejected_ended=pick.ended)
    if others and chosen_reward is not None:
        low = min(others, key=lambda c: c.reward)
        if chosen_reward - low.reward >= min_reward_gap:
            return Pair(image_id, chosen, low.text, "generic", source)
    if swap_rejected:
        fields = [f for f in swapper.found(chosen) if f in known]
        if fields:
            field = rng.choice(sorted(fields))
            swapped = swapper.swap(chosen, field, rng, avoid=known[field])
            if swapped is not None and swapped != chosen:
                return Pair(image_id, chosen, swapped, "swap:" + field, source)
    return None


def read_user_pairs(path: str | Path, known_ids: Iterable[str]) -> tuple[list[Pair], list[dict]]:
    """(pairs, quarantined rows with their reason) of a JSONL file of {image_id, chosen, rejected};
    an image id must be one of the training split's (`known_ids`)."""
    path = Path(path)
    if not path.is_file():
        raise EcomcapError(f"dpo.pairs_file {path} does not exist")
    ids = set(known_ids)
    pairs, bad, seen = [], [], set()
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            image_id, chosen, rejected = (str(row[k]).strip() for k in ("image_id", "chosen", "rejected"))
        except UnicodeDecodeError:
            bad.append({"line": n, "reason": "not UTF-8"})
            continue
        except (ValueError, KeyError, TypeError) as exc:
            bad.append({"line": n, "reason": f"not a JSON object with image_id, chosen, rejected ({exc})"})
            continue
        reason = ("image_id not in the training split" if image_id not in ids else
                  "empty caption" if not chosen or not rejected else
                  "chosen equals rejected" if chosen == rejected else
                  "duplicate of an earlier line" if (image_id, chosen, rejected) in seen else None)
        if reason:
            bad.append({"line": n, "image_id": image_id, "reason": reason})
        else:
            seen.add((image_id, chosen, rejected))
            pairs.append(Pair(image_id, chosen, rejected, "user", "user"))
    if not pairs:
        raise EcomcapError(f"dpo.pairs_file {path}: no usable pair ({len(bad)} rows quarantined, first: "
                           f"{bad[0]['reason'] if bad else 'the file is empty'})")
    return pairs, bad


def write_pairs(path: Path, pairs: Sequence[Pair]) -> None:
    """All pairs at once (written aside, then renamed): a killed build leaves no half file to resume from."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    os.replace(tmp, path)


def read_pairs(path: Path) -> list[Pair]:
    return [Pair(**json.loads(ln)) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def pair_counts(pairs: Sequence[Pair]) -> dict[str, int]:
    """How many pairs of each kind (logged and sent to MLflow): by reason and by chosen source."""
    reasons = Counter(p.reason.split(":")[0] for p in pairs)
    sources = Counter(p.source for p in pairs)
    return {"pairs": len(pairs), **{f"rejected_{k}": v for k, v in reasons.items()},
            **{f"chosen_{k}": v for k, v in sources.items()}}
