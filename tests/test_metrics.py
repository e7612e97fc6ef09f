"""ecomcap.metrics against pycocoevalcap (the oracle) on the same space-joined tokens."""
from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from ecomcap.errors import EcomcapError
from ecomcap.metrics import (
    CiderD,
    bleu,
    cider_d,
    evaluate,
    evaluate_files,
    rouge_l,
)
from ecomcap.metrics.ngrams import _sort_codes
from ecomcap.text import tokenize, tokenize_joined

TOL = 1e-9
METRICS = ("CIDEr-D", "BLEU-4", "ROUGE-L")
CJK = [chr(0x4E00 + 37 * i) for i in range(40)]  # a small pool, so n-grams recur
ASCII = ["xl", "2024", "abc", "5g", "m", "100ml", "ＸＬ", "Ｔ恤"]  # fullwidth: NFKC-folded
PUNCT = ["，", "！", "。", " ", "~", "（", "）", "\t"]


def caption(rng: random.Random, lo: int = 1, hi: int = 25, pool=CJK) -> str:
    parts = []
    for _ in range(rng.randint(lo, hi)):
        r = rng.random()
        parts.append(rng.choice(ASCII) if r < 0.1 else rng.choice(PUNCT) if r < 0.2
                     else rng.choice(pool))
    return "".join(parts)


def corpus(seed: int, n_images: int = 150):
    """Random (preds, refs) with every awkward case mixed in."""
    rng = random.Random(seed)
    refs, preds = {}, {}
    for i in range(n_images):
        key = f"{seed}-{i}"
        n_refs = 1 if rng.random() < 0.2 else rng.randint(2, 5)
        refs[key] = [caption(rng) for _ in range(n_refs)]
        if n_refs > 1 and rng.random() < 0.2:
            refs[key][-1] = refs[key][0]  # repeated reference
        if rng.random() < 0.05:
            refs[key][0] = "！！。"  # a reference that tokenises to nothing
        r = rng.random()
        if r < 0.1:
            preds[key] = refs[key][0]  # identical to a reference
        elif r < 0.15:
            preds[key] = ""  # empty prediction
        elif r < 0.2:
            preds[key] = "，。！"  # empty after tokenising
        elif r < 0.25:
            preds[key] = caption(rng, 1, 3)  # shorter than 4 tokens
        elif r < 0.3:
            preds[key] = caption(rng, 90, 110)  # longer than one 64-bit LCS word
        elif r < 0.35:
            refs[key].append(caption(rng, 70, 80))  # a long reference
            preds[key] = caption(rng)
        else:
            preds[key] = caption(rng)
    return preds, refs


def oracle(preds, refs) -> dict[str, tuple[float, np.ndarray]]:
    gts = {k: [tokenize_joined(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize_joined(preds[k])] for k in refs}
    cider, cider_img = Cider().compute_score(gts, res)
    with contextlib.redirect_stdout(io.StringIO()):
        bleus, bleu_img = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_img = Rouge().compute_score(gts, res)
    return {
        "CIDEr-D": (cider, np.asarray(cider_img)),
        "BLEU-4": (bleus[3], np.asarray(bleu_img[3])),
        "ROUGE-L": (rouge, np.asarray(rouge_img)),
        "BLEU": (bleus, [np.asarray(b) for b in bleu_img]),
    }


def assert_close(ours, theirs):
    assert abs(ours[0] - theirs[0]) < TOL, (ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=TOL)


def test_tokenizer_example():
    assert tokenize("ＸＬ码2024新款！") == ["xl", "码", "2024", "新", "款"]


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_pycocoevalcap(seed):
    preds, refs = corpus(seed)
    want = oracle(preds, refs)
    assert_close(cider_d(preds, refs), want["CIDEr-D"])
    assert_close(bleu(preds, refs), want["BLEU-4"])
    assert_close(rouge_l(preds, refs), want["ROUGE-L"])
    got = evaluate(preds, refs, per_image=True)
    assert got["n"] == len(refs)
    for m in METRICS:
        per_image = np.array([got["per_image"][k][m] for k in refs])
        assert_close((got[m], per_image), want[m])


def test_lower_bleu_orders_equal_pycocoevalcap():
    preds, refs = corpus(7)
    bleus, per_image = oracle(preds, refs)["BLEU"]
    for n in (1, 2, 3):
        assert_close(bleu(preds, refs, n=n), (bleus[n - 1], per_image[n - 1]))


EDGE_CASES = {
    "identical": ("白色连衣裙夏季新款", ["白色连衣裙夏季新款", "黑色短裤"]),
    "empty": ("", ["白色连衣裙", "连衣裙"]),
    "punct-only": ("！！", ["白色连衣裙"]),
    "empty-vs-empty": ("", ["。。", "白色"]),
    "one-token": ("白", ["白色", "白"]),
    "clipping": ("好好好好好好", ["好好", "好好好"]),
    "ascii-runs": ("ＸＬ码2024新款abc", ["xl码 2024 新款", "abc 2024"]),
    "long": ("款" * 70 + "新", ["款新" * 40, "新"]),
    "single-ref": ("简约百搭", ["简约"]),
}


def test_edge_cases_equal_pycocoevalcap():
    preds = {k: v[0] for k, v in EDGE_CASES.items()}
    refs = {k: v[1] for k, v in EDGE_CASES.items()}
    want = oracle(preds, refs)
    got = evaluate(preds, refs, per_image=True)
    for m in METRICS:
        assert_close((got[m], np.array([got["per_image"][k][m] for k in refs])), want[m])


def test_empty_prediction_scores():
    """pycocoevalcap scores an empty caption without crashing: CIDEr-D 0, BLEU-4 0 (brevity
    penalty exp(1 - 1e15) underflows), ROUGE-L 0 -- but ROUGE-L 1.0 when a reference is empty
    too, since "".split(" ") == [""] on both sides. We match all of it."""
    refs = {"a": ["白色连衣裙", "连衣裙"], "b": ["！！", "短裤"], "c": ["夏季新款"]}
    preds = {"a": "", "b": "", "c": "夏季新款"}
    got = evaluate(preds, refs, per_image=True)["per_image"]
    assert got["a"] == {"CIDEr-D": 0.0, "BLEU-4": 0.0, "ROUGE-L": 0.0}
    assert got["b"]["ROUGE-L"] == 1.0 and got["b"]["CIDEr-D"] == 0.0
    assert got["b"]["BLEU-4"] == 0.0


def test_all_references_empty():
    """pycocoevalcap's Cider crashes (max() of no document frequencies); ours scores 0."""
    refs, preds = {"a": ["！"], "b": ["。。"]}, {"a": "白", "b": ""}
    gts = {k: [tokenize_joined(r) for r in v] for k, v in refs.items()}
    with pytest.raises(ValueError):
        Cider().compute_score(gts, {k: [tokenize_joined(v)] for k, v in preds.items()})
    assert cider_d(preds, refs)[0] == 0.0
    assert evaluate(preds, refs)["n"] == 2


def test_single_image_cider_is_zero():
    """df from one image: log(1) - log(1) = 0 for every n-gram, as in pycocoevalcap."""
    assert cider_d({"a": "白色"}, {"a": ["白色"]})[0] == 0.0


def test_sort_fallback_for_huge_codes():
    """Codes too large to pack with their position take a stable argsort: same result."""
    code, index = np.array([5, 3, 5, 1, 3, 3]), np.arange(6)
    fast, slow = _sort_codes(code, 6, index), _sort_codes(code, 1 << 62, index)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast[1], [3, 1, 4, 5, 0, 2])


def test_empty_input():
    assert evaluate({}, {}) == {"CIDEr-D": 0.0, "BLEU-4": 0.0, "ROUGE-L": 0.0, "n": 0}


def test_input_checks():
    with pytest.raises(ValueError, match="differ"):
        evaluate({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="non-empty"):
        evaluate({"a": "x"}, {"a": []})


# ----------------------------------------------------------------------------- reward
@pytest.fixture(scope="module")
def reward_setup():
    """A corpus, 3 rounds of candidates (some tokens unknown to it), pycocoevalcap's scores."""
    _, refs = corpus(11, 120)
    rng = random.Random(5)
    wide = CJK + [chr(0x6000 + i) for i in range(10)]  # 10 characters the corpus never saw
    rounds = [{k: caption(rng, 0, 20, wide) for k in refs} for _ in range(3)]
    return refs, rounds, [oracle(r, refs)["CIDEr-D"][1] for r in rounds]


def test_reward_equals_pycocoevalcap_on_its_corpus(reward_setup):
    """Scoring every corpus image at once makes pycocoevalcap's df the corpus df."""
    refs, rounds, want = reward_setup
    scorer = CiderD(refs)
    for cands, expected in zip(rounds, want):
        ids = list(refs)
        np.testing.assert_allclose(scorer.score_ids([cands[k] for k in ids], ids), expected,
                                   rtol=0, atol=TOL)


def test_reward_batches_keep_corpus_df(reward_setup):
    """A batch of samples (repeated ids, any order) scores as within the whole corpus."""
    refs, rounds, want = reward_setup
    scorer = CiderD(refs)
    keys = list(refs)
    rng = random.Random(3)
    picks = [(rng.randrange(len(keys)), rng.randrange(3)) for _ in range(64)]
    picks += picks[:5]  # the very same sample twice
    ids = [keys[i] for i, _ in picks]
    cands = [rounds[r][keys[i]] for i, r in picks]
    expected = np.array([want[r][i] for i, r in picks])
    np.testing.assert_allclose(scorer.score_ids(cands, ids), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(scorer.score(cands, [refs[i] for i in ids]), expected,
                               rtol=0, atol=TOL)


def test_reward_with_unseen_references():
    """score() takes references outside the corpus; their unknown tokens still match."""
    scorer = CiderD({"a": ["白色连衣裙"], "b": ["黑色短裤"]})
    got = scorer.score(["蓝色外套", "白色连衣裙"], [["蓝色外套"], ["白色连衣裙"]])
    assert got[0] > 0 and got[1] > 0


def test_reward_errors():
    scorer = CiderD({"a": ["白色"]})
    with pytest.raises(KeyError, match="zz"):
        scorer.score_ids(["白色"], ["zz"])
    with pytest.raises(ValueError):
        scorer.score_ids(["白色", "黑色"], ["a"])
    with pytest.raises(ValueError):
        CiderD({})
    assert scorer.score_ids([], []).shape == (0,)


# ----------------------------------------------------------------------------- files
def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def gold_lines(refs):
    return [json.dumps({"image_id": k, "text": v}, ensure_ascii=False) for k, v in refs.items()]


def pred_lines(preds):
    return [json.dumps({"image_id": k, "text": v}, ensure_ascii=False) for k, v in preds.items()]


def test_evaluate_files_equals_evaluate(tmp_path):
    preds, refs = corpus(2, 40)
    gold = tmp_path / "IC_valid.jsonl"
    gold.write_text("\ufeff" + "\r\n".join(gold_lines(refs)) + "\r\n\r\n", encoding="utf-8")
    pred = write(tmp_path / "caption_gen.jsonl", pred_lines(preds))
    assert evaluate_files(pred, gold) == evaluate(preds, refs)


REFS = {"a": ["白色连衣裙"], "b": ["黑色短裤", "短裤"], "c": ["夏季新款"]}
PREDS = {"a": "白色", "b": "短裤", "c": "新款"}
OK_PRED = pred_lines(PREDS)
OK_GOLD = gold_lines(REFS)


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (None, OK_GOLD, "prediction file .*caption_gen.jsonl does not exist"),
        (OK_PRED, None, "reference file .*IC_valid.jsonl does not exist"),
        (OK_PRED[:1] + ["{not json"] + OK_PRED[2:], OK_GOLD, r"caption_gen.jsonl:2: invalid JSON"),
        (OK_PRED[:1] + ["[1, 2]"] + OK_PRED[2:], OK_GOLD, r"caption_gen.jsonl:2: .*not an object"),
        (OK_PRED + ['{"text": "白色"}'], OK_GOLD, r"caption_gen.jsonl:4: record has no image_id"),
        (OK_PRED[:2] + ['{"image_id": "c"}'], OK_GOLD,
         r"caption_gen.jsonl:3: 'text' must be one caption string, got nothing"),
        (OK_PRED[:2] + ['{"image_id": "c", "text": ["新款"]}'], OK_GOLD,
         r"caption_gen.jsonl:3: 'text' must be one caption string, got list"),
        (OK_PRED + [OK_PRED[1]], OK_GOLD, r"caption_gen.jsonl:4: image_id 'b' is predicted twice"),
        (OK_PRED[:1], OK_GOLD,
         r"2 of 3 images in .*IC_valid.jsonl have no prediction, e.g. 'b', 'c'"),
        (OK_PRED + ['{"image_id": "zz", "text": "x"}'], OK_GOLD,
         r"1 predicted images are not in .*IC_valid.jsonl, e.g. 'zz'"),
        (OK_PRED, OK_GOLD[:1] + ['{"image_id": "b", "text": [1, 2]}'] + OK_GOLD[2:],
         r"IC_valid.jsonl:2: 'text' is not a list of strings"),
        (OK_PRED, OK_GOLD[:1] + ['{"image_id": "b", "text": []}'] + OK_GOLD[2:],
         r"IC_valid.jsonl:2: image 'b' has no reference captions"),
        (OK_PRED, OK_GOLD + [OK_GOLD[0]], r"IC_valid.jsonl:4: image_id 'a' appears twice"),
        (OK_PRED, OK_GOLD[:1] + ["oops"] + OK_GOLD[2:], r"IC_valid.jsonl:2: invalid JSON"),
        (OK_PRED, [], r"IC_valid.jsonl has no references"),
    ],
)
def test_evaluate_files_errors(tmp_path, pred, gold, expected):
    pred_path, gold_path = tmp_path / "caption_gen.jsonl", tmp_path / "IC_valid.jsonl"
    if pred is not None:
        write(pred_path, pred)
    if gold is not None:
        write(gold_path, gold)
    with pytest.raises(EcomcapError, match=expected) as err:
        evaluate_files(pred_path, gold_path)
    assert "\n" not in str(err.value)


def test_package_does_not_import_pycocoevalcap():
    code = "import sys, ecomcap.metrics; sys.exit('pycocoevalcap' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
