"""SCST: reward equals CIDEr-D with training df, baseline math, the policy moves toward reward,
the K-sample expansion is right, and an interrupted run resumes exactly."""
import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from safetensors.torch import load_file

from ecomcap.config import FinetuneConfig, GenerateConfig, SCSTConfig, SFTConfig
from ecomcap.data.shards import read_references
from ecomcap.modeling.load import load_base, load_trained
from ecomcap.modeling.strategies import apply_strategy
from ecomcap.text import tokenize, tokenize_joined
from ecomcap.training.collate import PromptBuilder, answer_logits, with_answers
from ecomcap.training.data import ShardImages
from ecomcap.training.losses import scst_loss, sequence_logprob, token_logprobs
from ecomcap.training.rewards import EOS_WORD, CaptionReward, greedy_baseline, mean_of_others
from ecomcap.training.scst import repeat_prompts, run_scst, split_samples
from ecomcap.training.sft import run_sft

GEN = GenerateConfig(num_beams=1, max_new_tokens=8, batch_size=4)


def test_reward_is_cider_d_with_training_df_and_eos(small_data):
    refs = read_references(small_data["train"])
    reward = CaptionReward(refs)
    assert tokenize(EOS_WORD) == ["eosmark"]
    ids = list(refs)
    cands = [refs[k][0][:6] for k in ids]  # every corpus image scored at once: df == corpus df
    ours = reward.scores(cands, [True] * len(ids), ids)
    gts = {k: [tokenize_joined(r + EOS_WORD) for r in refs[k]] for k in ids}
    res = {k: [tokenize_joined(c + EOS_WORD)] for k, c in zip(ids, cands)}
    _, theirs = Cider().compute_score(gts, res)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    # a caption cut off at the length limit gets no final "... EOS" n-grams
    cut = reward.scores([refs[ids[0]][0]], [False], [ids[0]])
    whole = reward.scores([refs[ids[0]][0]], [True], [ids[0]])
    assert whole[0] > cut[0]


def test_baselines():
    s = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    np.testing.assert_allclose(mean_of_others(s, 3), [2.5, 2.0, 1.5, 25.0, 25.0, 10.0])
    np.testing.assert_allclose(mean_of_others(s, 1), np.zeros(6))
    np.testing.assert_allclose(greedy_baseline(np.array([1.0, 2.0]), 3), [1, 1, 1, 2, 2, 2])


def test_split_samples():
    seqs = torch.tensor([[5, 6, 2, 0, 0], [7, 8, 9, 4, 4], [2, 0, 0, 0, 0]])
    toks, ended = split_samples(seqs, eos_id=2, pad_id=0)
    assert toks == [[5, 6, 2], [7, 8, 9, 4, 4], [2]] and ended == [True, False, True]


def test_repeat_prompts_equals_encoding_repeated_images(tiny_model_cfg, small_data):
    _, processor = load_base(tiny_model_cfg)
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    data = ShardImages(small_data["train"])
    images = [data.image(0), data.image(1)]
    rep = repeat_prompts(pb.prompts(images), 3)
    direct = pb.prompts([im for im in images for _ in range(3)])
    for k in direct:
        assert torch.equal(rep[k], direct[k]), k


def test_policy_gradient_moves_probability_toward_rewarded_samples(tiny_model_cfg, small_data):
    model, processor = load_base(tiny_model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=8))
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    image = ShardImages(small_data["train"]).image(0)
    good, bad = pb.answer_ids(["红色条纹T恤", "蓝色帽子"], 16)
    enc = repeat_prompts(pb.prompts([image]), 2)
    batch = with_answers(enc, [good, bad], pb.pad_id)
    adv = torch.as_tensor(np.array([1.0, 0.0]) - mean_of_others(np.array([1.0, 0.0]), 2), dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)

    def seq_lp():
        logits, targets = answer_logits(model, batch)
        lp, mask = token_logprobs(logits, targets)
        return sequence_logprob(lp, mask, length_normalize=False)

    model.train()
    start = seq_lp().detach()
    for _ in range(5):
        loss = scst_loss(seq_lp(), adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = seq_lp().detach()
    assert end[0] > start[0] and end[1] < start[1]


def test_reward_and_diagnostics_see_the_raw_decoded_loop(tiny_model_cfg):
    """Post-processing collapses "简约百搭简约百搭…" for output; the reward must see the loop."""
    from ecomcap.data.clean import repeated_ngram_share
    from ecomcap.training.sampling import Sampler

    _, processor = load_base(tiny_model_cfg)
    sampler = Sampler.__new__(Sampler)  # only its decoding is under test (SCST's and DPO's samples)
    sampler.tok = processor.tokenizer
    loop = "简约百搭" * 4
    ids = processor.tokenizer(loop, add_special_tokens=False)["input_ids"]
    (decoded,) = sampler.decode([ids])
    assert decoded == loop and repeated_ngram_share(tokenize(decoded), 3) > 0.5


def test_scst_policy_is_the_same_in_sampling_log_probs_and_reference(tiny_model_cfg, small_data):
    """LoRA dropout would make the log-prob pass (train mode) another policy than the sampler."""
    from ecomcap.training.tuning import disable_dropout

    model, processor = load_base(tiny_model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=8, lora_dropout=0.5))
    assert disable_dropout(model) > 0
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    batch = with_answers(pb.prompts([ShardImages(small_data["train"]).image(0)]),
                         pb.answer_ids(["红色条纹T恤"], 16), pb.pad_id)
    model.train()
    with torch.no_grad():
        a, b = answer_logits(model, batch)[0], answer_logits(model, batch)[0]
        model.eval()
        c = answer_logits(model, batch)[0]
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)


@pytest.fixture(scope="module")
def sft_model(tiny_model_cfg, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_for_scst")
    return run_sft(small_data["train"], None, tiny_model_cfg, FinetuneConfig(strategy="full"),
                   SFTConfig(output_dir=out, max_steps=2, batch_size=4, lr=5e-3, eval_every=0), GEN).model_dir


def _scst_cfg(out, **kw):
    base = dict(output_dir=out, max_steps=4, batch_size=2, samples=2, lr=1e-3, eval_every=0,
                save_every=2, max_new_tokens=6, seed=2, finetune=FinetuneConfig(strategy="lora", lora_r=4))
    return SCSTConfig(**{**base, **kw})


def test_scst_runs_with_every_option_and_exports(tiny_model_cfg, small_data, sft_model, tmp_path):
    seen = []
    cfg = _scst_cfg(tmp_path / "o", max_steps=2, baseline="greedy", kl_weight=0.1, xe_weight=0.5,
                    length_normalize=True, eval_every=2, eval_images=3)
    res = run_scst(sft_model, small_data["train"], small_data["valid"], tiny_model_cfg, cfg, GEN,
                   on_metrics=lambda m, s: seen.append(m))
    keys = set().union(*seen)
    for k in ("reward", "baseline", "advantage_std", "sample_len", "repeat_ngram", "kl", "xe_loss", "val_CIDEr-D"):
        assert f"scst/{k}" in keys, k
    model, _ = load_trained(res.model_dir, tiny_model_cfg)  # adapter over the SFT model
    assert model is not None


def test_scst_resume_is_exact(tiny_model_cfg, small_data, sft_model, tmp_path):
    full = run_scst(sft_model, small_data["train"], None, tiny_model_cfg, _scst_cfg(tmp_path / "a"), GEN)
    with pytest.raises(InterruptedError):
        run_scst(sft_model, small_data["train"], None, tiny_model_cfg,
                 _scst_cfg(tmp_path / "b", stop_after_steps=3), GEN)
    resumed = run_scst(sft_model, small_data["train"], None, tiny_model_cfg, _scst_cfg(tmp_path / "b"), GEN)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a = load_file(str(full.final_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_run_scst_trains_a_policy_without_dropout(tiny_model_cfg, small_data, sft_model, tmp_path, monkeypatch):
    """The model run_scst hands to its loop has no active dropout (LoRA dropout 0.3 configured)."""
    from ecomcap.training import scst as scst_module

    seen = {}

    def stop(self, data, step_fn):
        seen["p"] = [m.p for m in self.model.modules() if isinstance(m, torch.nn.Dropout)]
        raise InterruptedError("inspected")

    monkeypatch.setattr(scst_module.TrainLoop, "run", stop)
    cfg = _scst_cfg(tmp_path, finetune=FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.3))
    with pytest.raises(InterruptedError):
        run_scst(sft_model, small_data["train"], None, tiny_model_cfg, cfg, GEN)
    assert seen["p"] and max(seen["p"]) == 0.0
