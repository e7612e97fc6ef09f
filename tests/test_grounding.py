"""Captions that see: attribute swaps, the text-negative loss terms, the combined SCST reward and
its baseline (hand-computed), the grounding scorer's train-only data (ids), the probe, reranking,
caption->image metrics, and the gate guarding attribute accuracy on a real MLflow registry."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecomcap.config import RunConfig
from ecomcap.config_encoders import GroundingConfig, GroundingTrainConfig, RewardConfig
from ecomcap.errors import EcomcapError
from ecomcap.grounding.evaluate import caption_to_image_ranks
from ecomcap.grounding.scorer import clip_s, distinctiveness
from ecomcap.inference.rerank import pick
from ecomcap.metrics.report import top_opener_share
from ecomcap.retrieval.data.swaps import AttributeSwapper, synthetic_vocab
from ecomcap.retrieval.train.losses import info_nce, sigmoid_loss
from ecomcap.training.rewards import CombinedReward, mean_of_others

SWAP = AttributeSwapper(synthetic_vocab())


def test_swap_changes_exactly_one_attribute_and_never_to_the_truth():
    text = "NOVA品牌红色条纹T恤，透气舒适"
    assert SWAP.found(text) == {"category": "T恤", "colour": "红色", "pattern": "条纹", "brand": "NOVA"}
    rng = random.Random(0)
    for field in ("category", "colour", "pattern", "brand"):
        for _ in range(20):
            out = SWAP.swap(text, field, rng, avoid="蓝色" if field == "colour" else None)
            found = SWAP.found(out)
            assert found[field] != SWAP.found(text)[field]
            assert {f: v for f, v in found.items() if f != field} == \
                {f: v for f, v in SWAP.found(text).items() if f != field}
            assert found.get("colour") != "蓝色"
    assert SWAP.swap("一件衣服", "colour", rng) is None  # names no colour: nothing to swap
    negs = SWAP.negatives(text, 3, random.Random(1))
    assert len(negs) == len(set(negs)) == 3 and text not in negs
    assert SWAP.strip(text, ["brand", "colour"]) == "品牌条纹T恤，透气舒适"


def test_text_negatives_count_for_their_own_item_only():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    neg = F.normalize(torch.randn(2, 8), dim=-1)
    owner = torch.tensor([0, 2])
    pos = torch.eye(3, dtype=torch.bool)
    t = torch.tensor(math.log(10.0))
    loss, extra = info_nce(q, d, pos, t, neg, owner)
    logits = 10.0 * q @ d.T
    l_qd = F.cross_entropy(logits, torch.arange(3))
    rows = []
    for i in range(3):  # item i against the 3 queries plus its own negative texts
        own = [10.0 * d[i] @ neg[n] for n in range(2) if owner[n] == i]
        rows.append(F.cross_entropy(torch.stack([*logits[:, i], *own])[None], torch.tensor([i])))
    assert float(loss) == pytest.approx(float((l_qd + torch.stack(rows).mean()) / 2), rel=1e-5)
    assert 0.0 <= extra["swap_acc"] <= 1.0
    plain, _ = info_nce(q, d, pos, t)
    assert float(loss) > float(plain)  # extra negatives only add to the item->text terms
    b = torch.tensor(-1.0)
    s_loss, _ = sigmoid_loss(q, d, pos, t, b, neg, owner)
    s_plain, _ = sigmoid_loss(q, d, pos, t, b)
    extra_pairs = -F.logsigmoid(-(10.0 * (d[owner] * neg).sum(-1) + b)).sum() / 3
    assert float(s_loss) == pytest.approx(float(s_plain + extra_pairs), rel=1e-5)


class FixedScorer:
    """Stands in for an encoder with hand-set embeddings (the arithmetic under test is ours)."""

    w, scale = 2.5, 10.0

    def __init__(self, image_emb, text_emb):
        self.i, self.t = np.asarray(image_emb, float), dict(text_emb)

    def images(self, images):
        return self.i[: len(images)]

    def texts(self, texts):
        return np.array([self.t[x] for x in texts], float)


def test_combined_reward_and_its_baseline_hand_computed():
    refs = {"a": ["红色条纹T恤"], "b": ["蓝色格子裤子"]}
    caps = ["红色条纹T恤", "红色T恤", "蓝色格子裤子", "蓝色裤子裤子裤子裤子"]
    emb = {caps[0]: [1, 0], caps[1]: [0.6, 0.8], caps[2]: [0, 1], caps[3]: [-0.6, 0.8]}
    scorer = FixedScorer([[1, 0], [0, 1]], emb)
    w = RewardConfig(cider=0.0, clip=2.0, distinct=1.0, repeat=3.0)
    total, terms = CombinedReward(refs, w, scorer)(caps, [True] * 4, ["a", "a", "b", "b"], [None, None], [0, 0, 1, 1])
    cos = np.array([1.0, 0.6, 1.0, 0.8])
    assert terms["clip_s"] == pytest.approx(2.5 * cos)
    own = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]]) @ np.array([[1, 0], [0, 1]]).T * 10
    want_dist = [own[k, o] - np.log(np.exp(own[k]).sum()) for k, o in enumerate([0, 0, 1, 1])]
    assert terms["distinct"] == pytest.approx(want_dist)
    assert terms["repeat"] == pytest.approx([0, 0, 0, 0.5])  # 8 3-grams of the loop, 4 of them repeats
    assert total == pytest.approx(2.0 * terms["clip_s"] + terms["distinct"] - 3.0 * terms["repeat"])
    base = mean_of_others(total, 2)  # one leave-one-out baseline over the combined reward
    assert base == pytest.approx([total[1], total[0], total[3], total[2]])
    cider_only, t2 = CombinedReward(refs, RewardConfig(), None)(caps, [True] * 4, ["a", "a", "b", "b"])
    assert set(t2) == {"cider"} and cider_only[0] > cider_only[1]  # the exact reference earns most
    with pytest.raises(ValueError, match="grounding scorer"):
        CombinedReward(refs, w, None)


def test_clip_s_and_distinctiveness_formulas():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.8, 0.6], [-1.0, 0.0]])
    assert clip_s(img, txt) == pytest.approx([2.0, 0.0])  # w * max(cos, 0)
    generic = distinctiveness(img, np.array([[0.7071, 0.7071]]), [0], 10.0)
    specific = distinctiveness(img, np.array([[1.0, 0.0]]), [0], 10.0)
    assert generic == pytest.approx([math.log(0.5)], abs=1e-4) and specific[0] > generic[0]


def test_rerank_picks_the_candidate_the_score_says():
    lp = np.array([-0.1, -0.5, -0.2, -0.3, -0.9, -0.4])  # 2 images x 3 candidates
    clip = np.array([0.0, 0.5, 0.1, 1.0, 2.0, 0.0])
    assert pick(lp, clip, 3, 0.0).tolist() == [0, 0]  # mu 0: beam order (most likely)
    assert pick(lp, clip, 3, 1.0).tolist() == [1, 1]  # -0.5+0.5 > -0.1; -0.9+2.0 wins
    assert pick(lp, clip, 3, 0.1).tolist() == [0, 0]


def test_caption_to_image_ranks_and_opener_share():
    img = np.eye(3)
    txt = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0]])
    assert caption_to_image_ranks(txt, img).tolist() == [0, 1, 0]
    tied = np.array([[0.7071, 0.7071, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert caption_to_image_ranks(tied, img).tolist() == [1, 0, 0]  # a tie is not a hit
    assert top_opener_share([list("这款红"), list("这款蓝"), list("一件绿"), []]) == 0.5


def test_config_requires_grounding_for_its_terms():
    with pytest.raises(ValueError, match="grounding.enabled"):
        RunConfig.model_validate({"scst": {"reward": {"clip": 1.0}}})
    with pytest.raises(ValueError, match="grounding.enabled"):
        RunConfig.model_validate({"registry": {"guard_metrics": ["cap2img_R1"]}})
    with pytest.raises(ValueError, match="synthetic"):
        RunConfig.model_validate({"data": {"source": "dir"}, "registry": {"guard_metrics": ["attr_mean"]}})
    cfg = RunConfig.model_validate({"grounding": {"enabled": True}, "scst": {"reward": {"clip": 1.0}},
                                    "registry": {"guard_metrics": ["attr_mean", "cap2img_R1"]}})
    assert cfg.scst.reward.needs_scorer


@pytest.fixture(scope="module")
def grounding(small_data, tmp_path_factory):
    """Scorer + evaluator trained for a few steps on the small set (real tiny Chinese-CLIP)."""
    from ecomcap.config_encoders import EncoderConfig, TinyEncoderConfig
    from ecomcap.grounding.train import build_grounding
    from ecomcap.metrics.attributes import read_attributes

    torch.set_num_threads(2)
    cfg = GroundingConfig(enabled=True, encoder=EncoderConfig(
        name_or_path="unused", device="cpu", tiny=TinyEncoderConfig(hidden=32, layers=1, heads=2, projection_dim=16,
                                                                   image_size=32, patch_size=16)),
        train=GroundingTrainConfig(max_steps=3, batch_size=8), probe_images=8)
    out = tmp_path_factory.mktemp("grounding")
    summary = build_grounding(small_data["train"], small_data["valid"], cfg, out, test_dir=small_data["test"],
                              attributes=read_attributes(small_data["raw"] / "attributes_valid.jsonl"))
    return {"out": out, "summary": summary, "cfg": cfg}


def test_scorer_trains_on_train_ids_only(grounding, small_data):
    from ecomcap.grounding.train import check_unseen, ids_digest
    from ecomcap.retrieval.data.batches import TrainingSet
    from ecomcap.training.data import ShardImages

    seen = TrainingSet(grounding["out"] / "pairs").items.ids  # what the encoders' loop drew from
    train = set(ShardImages(small_data["train"]).ids)
    assert set(seen) == train
    for split in ("valid", "test"):
        assert not set(seen) & set(ShardImages(small_data[split]).ids)
    s = grounding["summary"]
    for role in ("scorer", "evaluator"):
        assert s[role]["trained_on"]["ids_sha256"] == ids_digest(train) and s[role]["trained_on"]["images"] == len(train)
    assert s["scorer"]["fingerprint"] != s["evaluator"]["fingerprint"]  # independently trained
    assert set(s["scorer"]["probe"]) >= {"category", "colour"}
    assert all(0 <= v["accuracy"] <= 1 and v["n"] > 0 for v in s["scorer"]["probe"].values())
    with pytest.raises(EcomcapError, match="also in valid"):  # a leak is refused, naming the split
        check_unseen(small_data["train"], {"valid": small_data["train"]})
    with pytest.raises(EcomcapError, match="also in test"):
        check_unseen(small_data["train"], {"test": {sorted(train)[0]}})


def test_evaluator_seed_must_differ():
    with pytest.raises(ValueError, match="independently"):
        GroundingConfig(evaluator_seed=0)


def test_grounded_metrics_with_the_evaluator(grounding, small_data):
    from ecomcap.data.shards import read_references
    from ecomcap.grounding.evaluate import grounded_metrics
    from ecomcap.grounding.scorer import GroundingScorer

    refs = read_references(small_data["valid"])
    preds = {k: v[0] for k, v in refs.items()}
    m = grounded_metrics(preds, small_data["valid"], GroundingScorer(grounding["out"] / "evaluator"))
    assert m["n_grounded"] == len(refs) and 0 <= m["cap2img_R1"] <= m["cap2img_R5"] <= 1 and m["clip_s_eval"] >= 0


def test_gate_refuses_a_drop_in_attribute_accuracy(tmp_path):
    """Real MLflow registry (SQLite): attr_mean guarded like BLEU-4; a CIDEr-D gain does not buy a
    wrong-attribute regression beyond the tolerance."""
    from mlflow import MlflowClient

    from ecomcap.config import RegistryConfig
    from ecomcap.registry.gate import Gate, Scores

    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = RegistryConfig(model_name="grounded", guard_metrics=["BLEU-4", "attr_mean"], tolerance=0.02,
                         tolerances={"attr_mean": 0.01}, floor=0.5)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(cfg.model_name)
    ids = [f"i{k}" for k in range(50)]

    def version(cider, attr):
        src = tmp_path / f"m{cider}{attr}"
        src.mkdir()
        v = str(client.create_model_version(cfg.model_name, str(src)).version)
        return v, Scores({"CIDEr-D": cider, "BLEU-4": 0.3, "attr_mean": attr}, "fp", {i: cider for i in ids})

    gate = Gate(client, cfg)
    v1, s1 = version(1.0, 0.85)
    assert gate.evaluate_and_promote(v1, s1).promote
    v2, s2 = version(1.2, 0.83)  # +20% CIDEr-D, -2 points of attribute accuracy
    d2 = gate.evaluate_and_promote(v2, s2)
    assert not d2.promote and any("attr_mean" in r and "more than 0.01" in r for r in d2.reasons)
    assert str(client.get_model_version_by_alias(cfg.model_name, "champion").version) == v1
    v3, s3 = version(1.2, 0.845)  # within the tolerance: promoted
    assert gate.evaluate_and_promote(v3, s3).promote


def test_reranker_finds_the_scorer_its_model_ships(tmp_path):
    from ecomcap.config import GenerateConfig
    from ecomcap.inference.rerank import SCORER_DIR, with_scorer

    off = GenerateConfig()
    assert with_scorer(off, tmp_path) is off
    on = GenerateConfig.model_validate({"rerank": {"candidates": 3}})
    with pytest.raises(EcomcapError, match="grounding scorer is missing"):  # before any model loads
        with_scorer(on, tmp_path)
    (tmp_path / SCORER_DIR).mkdir()
    assert with_scorer(on, tmp_path).rerank.scorer_dir == str(tmp_path / SCORER_DIR)
    recorded = GenerateConfig.model_validate({"rerank": {"candidates": 3, "scorer_dir": SCORER_DIR}})
    assert with_scorer(recorded, tmp_path).rerank.scorer_dir == str(tmp_path / SCORER_DIR)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = GenerateConfig.model_validate({"rerank": {"candidates": 3, "scorer_dir": str(elsewhere)}})
    assert with_scorer(absolute, tmp_path).rerank.scorer_dir == str(elsewhere)
    missing = GenerateConfig.model_validate({"rerank": {"candidates": 3, "scorer_dir": str(tmp_path / "gone")}})
    with pytest.raises(EcomcapError, match="gone"):
        with_scorer(missing, tmp_path)


def test_scst_with_the_grounded_reward_logs_every_term(grounding, tiny_model_cfg, small_data, tmp_path, caplog):
    """Real SCST steps on the tiny captioner with the trained scorer: every weighted-in term and the
    reward's seconds are logged, and attributes the scorer does not see are said to be left out."""
    import logging

    from ecomcap.config import FinetuneConfig, GenerateConfig, SCSTConfig, SFTConfig
    from ecomcap.training.scst import run_scst
    from ecomcap.training.sft import run_sft

    gen = GenerateConfig(num_beams=1, max_new_tokens=8, batch_size=4)
    sft = run_sft(small_data["train"], None, tiny_model_cfg, FinetuneConfig(strategy="full"),
                  SFTConfig(output_dir=tmp_path / "sft", max_steps=2, batch_size=4, lr=5e-3, eval_every=0), gen)
    cfg = SCSTConfig(output_dir=tmp_path / "scst", max_steps=2, batch_size=2, samples=2, lr=1e-3, eval_every=0,
                     save_every=0, max_new_tokens=6, finetune=FinetuneConfig(strategy="lora", lora_r=4),
                     reward=RewardConfig(cider=1.0, clip=1.0, distinct=0.5, repeat=1.0))
    seen = []
    gcfg = grounding["cfg"].model_copy(update={"min_pairwise_acc": 1.01})  # nothing trusted: all blinded
    with caplog.at_level(logging.INFO, logger="ecomcap.training.scst"):
        run_scst(sft.model_dir, small_data["train"], None, tiny_model_cfg, cfg, gen, on_metrics=lambda m, s: seen.append(m),
                 scorer_dir=grounding["out"] / "scorer", grounding=gcfg)
    keys = set().union(*seen)
    for k in ("reward_cider", "reward_clip_s", "reward_distinct", "reward_repeat", "reward_s"):
        assert f"scst/{k}" in keys, k
    assert "neither pays nor charges" in caplog.text and "colour" in caplog.text
    with pytest.raises(EcomcapError, match="grounding"):
        run_scst(sft.model_dir, small_data["train"], None, tiny_model_cfg,
                 cfg.model_copy(update={"output_dir": tmp_path / "x"}), gen)


def test_generation_reranks_with_the_scorer(grounding, tiny_model_cfg, small_data, monkeypatch):
    """caption_images with rerank: the candidates' log-probs equal an independent one-by-one forward,
    and the caption chosen is the candidate log-prob + μ·CLIP-S picks."""
    from ecomcap.config import GenerateConfig
    from ecomcap.inference import rerank as rr
    from ecomcap.inference.generate import caption_images
    from ecomcap.modeling.load import load_trained
    from ecomcap.training.collate import PromptBuilder
    from ecomcap.training.data import ShardImages

    torch.manual_seed(0)
    model, processor = load_trained(tiny_model_cfg.name_or_path, tiny_model_cfg)
    model.eval()
    builder = PromptBuilder(processor, tiny_model_cfg.prompt)
    data = ShardImages(small_data["valid"])
    images = [data.image(i) for i in range(2)]
    scorer_dir = str(grounding["out"] / "scorer")
    seen = {}
    real_lp, real_rerank = rr.candidate_logprobs, rr.rerank

    def spy_lp(model_, enc, seqs, n, pad_id, suppress=()):
        seen.update(seqs=[list(x) for x in seqs])
        return real_lp(model_, enc, seqs, n, pad_id, suppress)

    def spy_rerank(texts, logprob, imgs, n, weight, scorer):
        seen.update(texts=list(texts), logprob=logprob)
        return real_rerank(texts, logprob, imgs, n, weight, scorer)

    monkeypatch.setattr(rr, "candidate_logprobs", spy_lp)
    monkeypatch.setattr(rr, "rerank", spy_rerank)
    cfg = GenerateConfig.model_validate({"num_beams": 3, "max_new_tokens": 6, "batch_size": 2,
                                         "rerank": {"candidates": 3, "weight": 50.0, "scorer_dir": scorer_dir}})
    out = caption_images(model, builder, images, cfg, progress=False)
    assert len(seen["seqs"]) == 6
    with torch.no_grad():  # each candidate alone: prompt + its tokens, mean log-prob of its tokens
        for k, seq in enumerate(seen["seqs"]):
            enc = builder.prompts([images[k // 3]])
            ids = torch.cat([enc["input_ids"], torch.tensor([seq])], dim=1)
            mm = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(seq), dtype=torch.long)], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                           pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits[0].float()
            suppress = [t for t in rr_suppressed(processor) if t not in seq]
            logits[:, suppress] = float("-inf")
            lp = torch.log_softmax(logits[-len(seq) - 1:-1], dim=-1).gather(1, torch.tensor(seq)[:, None]).mean()
            assert float(lp) == pytest.approx(float(seen["logprob"][k]), abs=1e-4)
    scorer = rr.load_scorer(scorer_dir, "cpu")
    clip = clip_s(scorer.images(images)[np.arange(6) // 3], scorer.texts(seen["texts"]), scorer.w)
    best = (seen["logprob"] + 50.0 * clip).reshape(2, 3).argmax(1)
    assert out == [seen["texts"][i * 3 + j] for i, j in enumerate(best)]


def rr_suppressed(processor):
    from ecomcap.modeling.processor import suppressed_token_ids

    return suppressed_token_ids(processor)


def test_generated_parts_are_keyed_by_the_scorer_content_not_its_path(grounding, tiny_model_cfg, small_data, tmp_path):
    """Fan-out pods download the champion (and its scorer) to different folders: they and the merge
    must still agree on where the parts are; another scorer is another key."""
    import shutil

    from ecomcap.config import GenerateConfig
    from ecomcap.inference.batch import _plan

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(grounding["out"] / "scorer", a)
    shutil.copytree(grounding["out"] / "scorer", b)

    def key(scorer):
        cfg = GenerateConfig.model_validate({"rerank": {"candidates": 2, "scorer_dir": str(scorer)}})
        return _plan(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["valid"], cfg, tmp_path / "parts")[1].dir

    assert key(a) == key(b)
    assert key(a) != key(grounding["out"] / "evaluator")


def test_training_pipeline_refuses_rerank_without_a_scorer():
    from pipelines.training import check_rerank_scorer

    with pytest.raises(EcomcapError, match="no grounding scorer"):
        check_rerank_scorer(RunConfig.model_validate({"generate": {"rerank": {"candidates": 3}}}))
    check_rerank_scorer(RunConfig.model_validate({"generate": {"rerank": {"candidates": 3}},
                                                  "grounding": {"enabled": True}}))
