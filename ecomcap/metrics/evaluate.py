"""The validation score: CIDEr-D, BLEU-4 and ROUGE-L of predictions against references.

One tokenisation (`ecomcap.text.tokenize`) and one n-gram pass feed all three metrics; the
numbers are on pycocoevalcap's raw scale (CIDEr-D x10 as it reports, BLEU/ROUGE in [0, 1]).
`evaluate_files` reads `caption_gen.jsonl` against `IC_valid.jsonl` and refuses, with a
one-line message naming the file and line, anything that would make the score wrong.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecomcap.data.formats import caption_record, iter_lines, parse_json_line
from ecomcap.errors import EcomcapError
from ecomcap.metrics.bleu import BleuCounts
from ecomcap.metrics.cider import CiderSums, self_df_weights
from ecomcap.metrics.ngrams import batch_from_dicts, order_passes
from ecomcap.metrics.rouge import rouge_scores
from ecomcap.text import is_encodable

METRICS = ("CIDEr-D", "BLEU-4", "ROUGE-L")


def evaluate(
    preds: Mapping[Hashable, str],
    refs: Mapping[Hashable, Sequence[str]],
    per_image: bool = False,
) -> dict[str, Any]:
    """{"CIDEr-D", "BLEU-4", "ROUGE-L", "n"} (+ "per_image": {id: {metric: score}})."""
    keys, batch = batch_from_dicts(preds, refs)
    cider, bleu = CiderSums(batch), BleuCounts(batch)
    rouge = np.zeros(0)
    for p in order_passes(batch):
        cider.add(p, self_df_weights(p, batch.n_units))
        bleu.add(p)
        if p.k == 1:
            rouge = rouge_scores(batch, p)
    bleu_corpus, bleu_images = bleu.scores()
    images = {"CIDEr-D": cider.scores(), "BLEU-4": bleu_images[:, -1], "ROUGE-L": rouge}
    out: dict[str, Any] = {
        "CIDEr-D": float(np.mean(images["CIDEr-D"])) if keys else 0.0,
        "BLEU-4": bleu_corpus[-1] if keys else 0.0,
        "ROUGE-L": float(np.mean(images["ROUGE-L"])) if keys else 0.0,
        "n": len(keys),
    }
    if per_image:
        columns = [images[m].tolist() for m in METRICS]
        out["per_image"] = {k: dict(zip(METRICS, vals)) for k, vals in zip(keys, zip(*columns))}
    return out


def _examples(ids: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _records(path: Path, what: str):
    """(line number, record) for each JSON line; EcomcapError naming the line otherwise."""
    if not path.is_file():
        raise EcomcapError(f"{what} file {path} does not exist")
    for line in iter_lines(path):
        try:
            yield line.line_no, parse_json_line(line)
        except ValueError as exc:
            raise EcomcapError(f"{path}:{line.line_no}: {exc}") from None


def read_references(path: str | Path, issues: Counter | None = None,
                    skipped: set[str] | None = None) -> dict[str, list[str]]:
    """Gold captions ``{"image_id", "text": [refs]}`` per line -> {image_id: refs}.

    A reference that is not valid Unicode is dropped and counted in `issues`; an image left
    with none is left out of the score (counted, its id added to `skipped`), never the whole
    evaluation."""
    path = Path(path)
    issues = Counter() if issues is None else issues
    refs: dict[str, list[str]] = {}
    for no, obj in _records(path, "reference"):
        try:
            image_id, texts = caption_record(obj, need_text=True)
        except ValueError as exc:
            raise EcomcapError(f"{path}:{no}: {exc}") from None
        valid = [t for t in texts or [] if is_encodable(t)]
        issues["references_bad_unicode"] += len(texts or []) - len(valid)
        if texts and not valid:
            issues["gold_images_without_valid_reference"] += 1
            if skipped is not None:
                skipped.add(image_id)
            continue
        texts = valid
        if not texts:
            raise EcomcapError(f"{path}:{no}: image {image_id!r} has no reference captions")
        if image_id in refs:
            raise EcomcapError(f"{path}:{no}: image_id {image_id!r} appears twice")
        refs[image_id] = texts
    if not refs:
        raise EcomcapError(f"{path} has no references")
    return refs


def read_predictions(path: str | Path, issues: Counter | None = None) -> dict[str, str]:
    """``caption_gen.jsonl``: one ``{"image_id", "text": "caption"}`` per line -> {id: text}.

    A caption that is not valid Unicode is scored as it is (the tokeniser drops the broken
    characters) and counted in `issues`."""
    path = Path(path)
    issues = Counter() if issues is None else issues
    preds: dict[str, str] = {}
    for no, obj in _records(path, "prediction"):
        text = obj.get("text")
        if not isinstance(text, str):
            got = "nothing" if text is None else type(text).__name__
            raise EcomcapError(f"{path}:{no}: 'text' must be one caption string, got {got}")
        try:
            image_id, texts = caption_record(obj, need_text=True)
        except ValueError as exc:
            raise EcomcapError(f"{path}:{no}: {exc}") from None
        if image_id in preds:
            raise EcomcapError(f"{path}:{no}: image_id {image_id!r} is predicted twice")
        preds[image_id] = texts[0]  # type: ignore[index]
        issues["predictions_bad_unicode"] += not is_encodable(preds[image_id])
    return preds


def evaluate_files(
    pred_path: str | Path, gold_path: str | Path, per_image: bool = False
) -> dict[str, Any]:
    """Score a prediction file against a gold file; every gold image must be predicted once.
    Unusable single references/captions are counted under "input_issues" (when there are any)."""
    issues: Counter = Counter()
    skipped: set[str] = set()
    refs = read_references(gold_path, issues, skipped)
    preds = {i: t for i, t in read_predictions(pred_path, issues).items() if i not in skipped}
    missing = [i for i in refs if i not in preds]
    if missing:
        raise EcomcapError(
            f"{pred_path}: {len(missing)} of {len(refs)} images in {gold_path} have no "
            f"prediction, e.g. {_examples(missing)}"
        )
    extra = [i for i in preds if i not in refs]
    if extra:
        raise EcomcapError(
            f"{pred_path}: {len(extra)} predicted images are not in {gold_path}, "
            f"e.g. {_examples(extra)}"
        )
    out = evaluate(preds, refs, per_image=per_image)
    if +issues:
        out["input_issues"] = dict(+issues)
    return out
