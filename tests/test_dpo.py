"""DPO: pair building on known wrong attributes, loops and generic captions; user pairs with a
quarantine; the loss on hand-computed cases; the reference log-probs are the starting policy's;
the stage runs, logs, and resumes exactly."""
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from ecomcap.config import DPOConfig, FinetuneConfig, GenerateConfig, RunConfig, SFTConfig
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.data.swaps import AttributeSwapper, synthetic_vocab
from ecomcap.training.dpo import PAIRS_FILE, run_dpo
from ecomcap.training.dpo_pairs import (
    Candidate,
    choose_pair,
    known_attributes,
    read_user_pairs,
    wrong_fields,
)
from ecomcap.training.losses import dpo_loss
from ecomcap.training.sft import run_sft

GEN = GenerateConfig(num_beams=1, max_new_tokens=8, batch_size=4)
SWAP = AttributeSwapper(synthetic_vocab())
TRUTH = {"category": "T恤", "colour": "红色", "pattern": "条纹", "brand": None}


def test_a_known_wrong_attribute_is_rejected_against_the_best_right_sample():
    known = known_attributes([], SWAP, TRUTH)
    assert known == {"category": "T恤", "colour": "红色", "pattern": "条纹"}
    cands = [Candidate("红色条纹T恤，简约百搭", 1.0, wrong=wrong_fields("红色条纹T恤，简约百搭", known)),
             Candidate("红色条纹T恤", 0.7, wrong=wrong_fields("红色条纹T恤", known)),
             Candidate("蓝色条纹T恤，简约百搭", 1.2, wrong=wrong_fields("蓝色条纹T恤，简约百搭", known)),
             Candidate("红色格子T恤", 0.2, wrong=wrong_fields("红色格子T恤", known))]
    assert cands[2].wrong == ("colour",) and cands[3].wrong == ("pattern",) and not cands[0].wrong
    pair = choose_pair("a", cands, ["红色条纹T恤"], known, SWAP, random.Random(0))
    # chosen: the highest reward with every attribute right (not the wrong 1.2 one);
    # rejected: the best-scoring wrong one (the fluent, wrong caption)
    assert (pair.chosen, pair.rejected, pair.reason, pair.source) == \
        ("红色条纹T恤，简约百搭", "蓝色条纹T恤，简约百搭", "wrong:colour", "sample")


def test_loops_generic_captions_reference_fallback_and_swaps():
    known = dict(TRUTH, brand=None)
    known = known_attributes([], SWAP, known)
    ok = dict(wrong=())
    loop = [Candidate("红色条纹T恤", 1.0, **ok), Candidate("红色条纹T恤条纹T恤条纹T恤", 0.9, loop=True, **ok)]
    assert choose_pair("a", loop, [], known, SWAP, random.Random(0)).reason == "loop"
    cut = [Candidate("红色条纹T恤", 1.0, **ok), Candidate("红色条纹T恤，", 0.9, ended=False, **ok)]
    assert choose_pair("a", cut, [], known, SWAP, random.Random(0)).reason == "unfinished"
    generic = [Candidate("红色条纹T恤，修身", 1.0, **ok), Candidate("红色条纹T恤", 0.5, **ok)]
    assert choose_pair("a", generic, [], known, SWAP, random.Random(0)).rejected == "红色条纹T恤"
    close = [Candidate("红色条纹T恤，修身", 1.0, **ok), Candidate("红色条纹T恤", 0.9, **ok)]
    swap = choose_pair("a", close, [], known, SWAP, random.Random(0))  # too close to call: a swapped chosen
    assert swap.reason.startswith("swap:") and swap.chosen == "红色条纹T恤，修身"
    assert wrong_fields(swap.rejected, known) == (swap.reason.split(":")[1],)
    assert choose_pair("a", close, [], known, SWAP, random.Random(0), swap_rejected=False) is None
    all_wrong = [Candidate("蓝色条纹T恤", 1.0, wrong=("colour",)), Candidate("红色格子T恤", 0.5, wrong=("pattern",))]
    pair = choose_pair("a", all_wrong, ["红色条纹T恤。", "红色T恤"], known, SWAP, random.Random(0))
    assert (pair.chosen, pair.source, pair.rejected) == ("红色条纹T恤。", "reference", "蓝色条纹T恤")
    assert choose_pair("a", all_wrong, ["红色T恤"], known, SWAP, random.Random(0)) is None  # no right reference
    assert choose_pair("a", all_wrong, ["红色条纹T恤"], known, SWAP, random.Random(0), chosen_fallback="none") is None


def test_a_caption_that_names_two_values_of_a_field_is_wrong_about_it():
    known = known_attributes([], SWAP, TRUTH)
    assert wrong_fields("黑色的红色条纹T恤", known) == ()  # names the truth (the metric's rule) ...
    assert wrong_fields("黑色的红色条纹T恤", known, SWAP) == ("colour",)  # ... and contradicts it
    assert wrong_fields("红色条纹T恤，纯色百搭", known, SWAP) == ("pattern",)
    assert wrong_fields("红色条纹T恤", known, SWAP) == ()


def test_a_wrong_sample_cut_at_the_length_limit_keeps_its_missing_eos():
    known = known_attributes([], SWAP, TRUTH)
    cands = [Candidate("红色条纹T恤", 1.0), Candidate("红色条纹", 0.8, ended=False, wrong=("category",))]
    pair = choose_pair("a", cands, [], known, SWAP, random.Random(0))
    assert pair.reason == "wrong:category" and pair.rejected_ended is False


def test_identical_samples_give_a_swapped_pair_or_none():
    known = known_attributes([], SWAP, TRUTH)
    same = [Candidate("红色条纹T恤", 1.0)] * 3
    pair = choose_pair("a", same, [], known, SWAP, random.Random(0))
    assert pair.reason.startswith("swap:") and pair.chosen == "红色条纹T恤"
    assert choose_pair("a", same, [], known, SWAP, random.Random(0), swap_rejected=False) is None


def test_a_multi_colour_product_from_references_is_not_called_wrong():
    """Without ground truth, a colour the references name is no contradiction, and a field the
    references do not agree on is not known."""
    from ecomcap.training.dpo_pairs import named_words

    refs = ["黑色T恤白色领口", "黑色T恤，白色袖口", "黑色白色拼接T恤"]
    known, allowed = known_attributes(refs, SWAP), named_words(refs, SWAP)
    assert known == {"category": "T恤"}
    assert all(not wrong_fields(r, known, SWAP, allowed) for r in refs)
    assert wrong_fields("黑色白色帽子", known, SWAP, allowed) == ("category",)
    refs = ["黑色T恤", "黑色纯棉T恤"]
    known, allowed = known_attributes(refs, SWAP), named_words(refs, SWAP)
    assert wrong_fields("黑色红色T恤", known, SWAP, allowed) == ("colour",)


def test_rank_slices_cover_every_item_once_with_equal_batches():
    from ecomcap.training.dpo import _rank_slice

    items = list(range(7))
    for world in (1, 2, 3, 8):
        slices = [_rank_slice(items, world, r) for r in range(world)]
        assert len({len(sl) for sl in slices}) == 1  # every rank runs as many batches
        kept = [x for sl in slices for x, keep in sl if keep]
        assert kept == items


def test_an_unfinished_rejected_sample_is_scored_without_an_eos(tiny_model_cfg):
    from ecomcap.modeling.load import load_base
    from ecomcap.training.collate import PromptBuilder
    from ecomcap.training.dpo import _answers
    from ecomcap.training.dpo_pairs import Pair

    _, processor = load_base(tiny_model_cfg)
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    ids = _answers(pb, [Pair("a", "红色T恤", "蓝色T恤", "wrong:colour", "sample"),
                        Pair("a", "红色T恤", "红色T恤红色T恤", "unfinished", "sample", rejected_ended=False)], 64)
    c, r, r_cut = ids[0], ids[1], ids[3]  # chosen, rejected, chosen, rejected
    assert c[-1] == pb.eos_id and r[-1] == pb.eos_id and r_cut[-1] != pb.eos_id


def test_known_attributes_from_references_without_ground_truth():
    refs = ["红色条纹T恤，简约", "这款红色T恤带条纹", "红色格子T恤"]
    assert known_attributes(refs, SWAP) == {"colour": "红色", "category": "T恤"}  # pattern: refs disagree


def test_dpo_loss_on_hand_computed_values():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, logs = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = [0.5 * (1 - (-1)), 0.5 * (0 - 1)]  # [1.0, -0.5]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert logs["reward_accuracy"] == 0.5 and logs["reward_margin"] == pytest.approx(0.25)
    assert logs["reward_chosen"] == pytest.approx((0.5 + 0.0) / 2)


def test_user_pairs_are_read_and_bad_rows_quarantined(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"image_id": "1", "chosen": "红色T恤", "rejected": "蓝色T恤"},
            {"image_id": "9", "chosen": "红色T恤", "rejected": "蓝色T恤"},
            {"image_id": "1", "chosen": "红色T恤", "rejected": "红色T恤"},
            {"image_id": "1", "chosen": "", "rejected": "x"}]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows + rows[:1]] + [b"{not json", b"\xff\xfe"]
    path.write_bytes(b"\n".join(lines))
    pairs, bad = read_user_pairs(path, ["1", "2"])
    assert [(p.image_id, p.reason) for p in pairs] == [("1", "user")]
    assert [b["reason"] for b in bad][:4] == ["image_id not in the training split", "chosen equals rejected",
                                            "empty caption", "duplicate of an earlier line"]
    assert bad[4]["line"] == 6 and bad[5] == {"line": 7, "reason": "not UTF-8"}
    with pytest.raises(EcomcapError, match="no usable pair"):
        read_user_pairs(path, ["2"])
    with pytest.raises(EcomcapError, match="does not exist"):
        read_user_pairs(tmp_path / "missing.jsonl", ["1"])


def test_run_config_refuses_dpo_without_pairs_or_with_answers_shorter_than_samples():
    with pytest.raises(ValueError, match="no pairs"):
        RunConfig.model_validate({"dpo": {"enabled": True, "own_pairs": False}})
    with pytest.raises(ValueError, match="max_answer_tokens"):
        DPOConfig(max_new_tokens=64, max_answer_tokens=64)


@pytest.fixture(scope="module")
def start_model(tiny_model_cfg, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_for_dpo")
    return run_sft(small_data["train"], None, tiny_model_cfg, FinetuneConfig(strategy="full"),
                   SFTConfig(output_dir=out, max_steps=2, batch_size=4, lr=5e-3, eval_every=0), GEN).model_dir


def _attributes(small_data):
    from ecomcap.metrics.attributes import read_attributes

    return read_attributes(small_data["raw"] / "attributes_train.jsonl")


def _cfg(out, **kw):
    base = dict(output_dir=out, max_steps=4, batch_size=3, samples=3, pair_images=8, lr=1e-3, beta=0.5,
                eval_every=0, save_every=2, max_new_tokens=6, seed=1, finetune=FinetuneConfig(strategy="lora", lora_r=4))
    return DPOConfig(**{**base, **kw})


def test_dpo_builds_pairs_with_reference_logprobs_trains_and_logs(tiny_model_cfg, small_data, start_model, tmp_path):
    seen = []
    res = run_dpo(start_model, small_data["train"], small_data["valid"], tiny_model_cfg,
                  _cfg(tmp_path / "o", rpo_alpha=0.2, eval_every=4, eval_images=3), GEN,
                  on_metrics=lambda m, s: seen.append(m), attributes=_attributes(small_data))
    keys = set().union(*seen)
    for k in ("pairs", "loss", "reward_margin", "reward_accuracy", "chosen_nll", "val_CIDEr-D"):
        assert f"dpo/{k}" in keys, k
    pairs = [json.loads(ln) for ln in (res.model_dir.parent / PAIRS_FILE).read_text(encoding="utf-8").splitlines()]
    assert 0 < len(pairs) <= 8 and all(p["ref_chosen"] < 0 and p["ref_rejected"] < 0 for p in pairs)
    truth = _attributes(small_data)
    for p in pairs:  # a sampled chosen never gets a known attribute wrong
        if p["source"] == "sample":
            assert not wrong_fields(p["chosen"], known_attributes([], SWAP, truth[p["image_id"]])), p
    assert (res.final_dir / "adapter_model.safetensors").is_file()


def test_reference_logprobs_are_the_starting_policys(tiny_model_cfg, small_data, start_model, tmp_path, monkeypatch):
    """After a step has moved the adapter, the adapter-off pass still gives the stored reference
    log-probs of each pair (computed with the pairs, before training), and the policy's differ."""
    from ecomcap.training import dpo as dpo_module

    seen = []
    original = dpo_module.DPOStep.__call__

    def spy(self, examples):
        pairs = [e.pair for e in examples]
        enc = self.loop.builder.prompts([e.image for e in examples])
        answers = dpo_module._answers(self.loop.builder, pairs, self.cfg.max_answer_tokens)
        with torch.no_grad():
            ref, _ = self.policy.sequence_logprobs(enc, answers, 2, reference=True)
            pol, _ = self.policy.sequence_logprobs(enc, answers, 2)
        seen.append((ref, pol, pairs))
        return original(self, examples)

    monkeypatch.setattr(dpo_module.DPOStep, "__call__", spy)
    run_dpo(start_model, small_data["train"], None, tiny_model_cfg, _cfg(tmp_path / "o", max_steps=2, lr=5e-2, warmup_ratio=0.0), GEN,
            attributes=_attributes(small_data))
    ref, pol, pairs = seen[1]  # the second step: one optimizer step later
    stored = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs]).flatten()
    torch.testing.assert_close(ref, stored, rtol=0, atol=1e-4)
    assert (pol - ref).abs().max() > 1e-3


def test_dpo_resume_is_exact_and_reuses_the_pairs(tiny_model_cfg, small_data, start_model, tmp_path, monkeypatch):
    attrs = _attributes(small_data)
    full = run_dpo(start_model, small_data["train"], None, tiny_model_cfg, _cfg(tmp_path / "a"), GEN, attributes=attrs)
    with pytest.raises(InterruptedError):
        run_dpo(start_model, small_data["train"], None, tiny_model_cfg, _cfg(tmp_path / "b", stop_after_steps=3),
                GEN, attributes=attrs)
    from ecomcap.training import dpo as dpo_module

    def no_rebuild(*a, **k):
        raise AssertionError("a resumed run must read its pairs back, not sample new ones")

    monkeypatch.setattr(dpo_module.PairBuilder, "own_pairs", no_rebuild)
    resumed = run_dpo(start_model, small_data["train"], None, tiny_model_cfg, _cfg(tmp_path / "b"), GEN,
                      attributes=attrs)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a = load_file(str(full.final_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert (full.model_dir.parent / PAIRS_FILE).read_text() == (resumed.model_dir.parent / PAIRS_FILE).read_text()


def test_dpo_on_user_pairs_only(tiny_model_cfg, small_data, start_model, tmp_path):
    from ecomcap.training.data import ShardImages

    ids = ShardImages(small_data["train"]).ids[:3]
    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "chosen": "红色条纹T恤", "rejected": "蓝色格子帽子"},
                                       ensure_ascii=False) + "\n" for i in ids) + '{"image_id": "nope", "chosen": "a", '
                    '"rejected": "b"}\n', encoding="utf-8")
    res = run_dpo(start_model, small_data["train"], None, tiny_model_cfg,
                  _cfg(tmp_path / "o", own_pairs=False, pairs_file=path, max_steps=2), GEN)
    out = res.model_dir.parent
    assert [json.loads(ln)["reason"] for ln in (out / PAIRS_FILE).read_text().splitlines()] == ["user"] * 3
    assert json.loads((out / "pairs_quarantine.jsonl").read_text())["reason"] == "image_id not in the training split"
