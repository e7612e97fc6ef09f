"""Retrieval metrics against references written from the rules, and the evaluate CLI."""
import json
import random

import numpy as np
import pytest
import torch

from ecomcap.cli import main
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.evaluate.metrics import (
    chance_recall,
    check_submission,
    match_f1,
    recall_scores,
    topk_search,
)


def _muge_reference(pred, gold):
    """Written from the MUGE rule: a query counts at K if any gold item is in its first K ids."""
    out = {}
    for k in (1, 5, 10):
        out[f"R@{k}"] = 100.0 * sum(bool(set(pred[q][:k]) & set(g)) for q, g in gold.items()) / len(gold)
    out["MeanRecall"] = (out["R@1"] + out["R@5"] + out["R@10"]) / 3
    return out


@pytest.mark.parametrize("seed", range(5))
def test_recall_equals_reference_on_random_submissions(seed):
    rng = random.Random(seed)
    pool = [f"i{j}" for j in range(40)]
    gold = {f"q{i}": rng.sample(pool, rng.randint(1, 10)) for i in range(60)}
    pred = {q: rng.sample(pool, 10) for q in gold}
    got = recall_scores(pred, gold)
    for key, value in _muge_reference(pred, gold).items():
        assert got[key] == pytest.approx(value)
    # per-query scores average to MeanRecall (what the registry gate bootstraps over)
    assert np.mean(list(got["per_query"].values())) == pytest.approx(got["MeanRecall"])


@pytest.mark.parametrize("bad,message", [
    ({"q0": ["a"] * 10}, "duplicate"),
    ({"q0": [str(i) for i in range(9)]}, "exactly 10"),
    ({"zz": [str(i) for i in range(10)]}, "not in the gold"),
])
def test_malformed_submissions_are_named(bad, message):
    gold = {"q0": ["1"]}
    with pytest.raises(EcomcapError, match=message):
        check_submission(bad, gold)
    with pytest.raises(EcomcapError, match="no prediction"):
        check_submission({}, gold)


def test_topk_search_is_exact():
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(37, 16, generator=g), torch.randn(501, 16, generator=g)
    scores, idx = topk_search(queries.numpy(), gallery.numpy(), k=10, chunk=8)
    ref_s, ref_i = torch.topk(queries @ gallery.T, 10, dim=1)
    np.testing.assert_array_equal(idx, ref_i.numpy())
    np.testing.assert_allclose(scores, ref_s.numpy(), rtol=1e-5, atol=1e-6)


def test_chance_level_matches_simulation():
    got = chance_recall(50, [1, 3, 6])
    rng = np.random.default_rng(0)
    sims = {k: [] for k in (1, 5, 10)}
    for p in [1, 3, 6] * 4000:
        first = rng.permutation(50)[:10]
        for k in sims:
            sims[k].append(bool((first[:k] < p).any()))
    for k in sims:
        assert got[f"R@{k}"] == pytest.approx(100 * np.mean(sims[k]), abs=1.5)


def test_match_f1_equals_per_posting_reference():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    groups = [f"g{i % 7}" for i in range(30)]
    sims = emb @ emb.T
    for t in (0.2, 0.6, 0.95):
        f1s = []
        for i in range(30):
            pred = {j for j in range(30) if sims[i, j] >= t} | {i}
            true = {j for j in range(30) if groups[j] == groups[i]}
            f1s.append(2 * len(pred & true) / (len(pred) + len(true)))
        assert match_f1(emb, groups, [t], chunk=7)[t] == pytest.approx(np.mean(f1s), rel=1e-6)
    # "at least two": a posting alone above the threshold gets its nearest neighbour
    assert match_f1(emb, groups, [1.01], at_least_two=True)[1.01] != match_f1(emb, groups, [1.01])[1.01]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_retrieval_evaluate_cli(tmp_path, capsys):
    gold, pred = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    _write(gold, [{"query_id": 1, "query_text": "红色", "item_ids": [3]},
                  {"query_id": 2, "query_text": "蓝色", "item_ids": [50, 51]}])
    _write(pred, [{"query_id": 1, "item_ids": [3] + list(range(10, 19))},
                  {"query_id": 2, "item_ids": list(range(20, 25)) + [51] + list(range(30, 34))}])
    assert main(["retrieval-evaluate", "--pred", str(pred), "--gold", str(gold), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"R@1": 50.0, "R@5": 50.0, "R@10": 100.0, "MeanRecall": 66.67}
    _write(pred, [{"query_id": 1, "item_ids": [3] * 10}, {"query_id": 2, "item_ids": list(range(10))}])
    assert main(["retrieval-evaluate", "--pred", str(pred), "--gold", str(gold)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query 1: duplicate item ids" in err[0]


@pytest.mark.parametrize("rows,message", [
    ([{"query_id": 1, "item_ids": [3]}, {"query_id": 1, "item_ids": [4]}], "gold.jsonl line 2: query 1 appears twice"),
    ([{"query_id": 1, "item_ids": [3]}, {"query_id": 2, "query_text": "蓝色"}], "gold.jsonl line 2: query 2 has no item_ids"),
    ([{"query_id": 1, "item_ids": []}], "gold.jsonl line 1: query 1 has no item_ids"),
])
def test_retrieval_evaluate_rejects_bad_gold_rows(tmp_path, capsys, rows, message):
    gold, pred = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    _write(gold, rows)
    _write(pred, [{"query_id": 1, "item_ids": [3] + list(range(10, 19))}])
    assert main(["retrieval-evaluate", "--pred", str(pred), "--gold", str(gold)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
