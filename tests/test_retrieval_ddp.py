"""Contrastive training over 2 processes (CPU, gloo, through `ecomcap.launch` like the other DDP
tests): with embeddings gathered across ranks and gradients averaged, 2 processes x B pairs give
the loss and parameter gradients of one process on the merged 2B batch, for InfoNCE and the
sigmoid loss, with and without gradient caching (hard negatives, own negative texts and the
same-product term included)."""
import json
import random
from pathlib import Path

import pytest
import torch

from ecomcap.config import LaunchConfig
from ecomcap.launch import launch
from ecomcap.retrieval.config import (
    RetrievalDataConfig,
    RetrievalRunConfig,
    RetrievalSynthConfig,
    TinyEncoderConfig,
)
from ecomcap.retrieval.data.batches import TrainingSet
from ecomcap.retrieval.data.prepare import prepare_retrieval_data
from ecomcap.retrieval.data.swaps import synthetic_vocab
from ecomcap.retrieval.model.tiny import ensure_tiny_encoder
from tests import ddp_retrieval_job as job

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
TINY = TinyEncoderConfig(hidden=32, layers=1, heads=2, projection_dim=16, image_size=32, patch_size=16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rddp")
    cfg = RetrievalDataConfig(work_dir=root / "data", splits=["train"],
                              synth=RetrievalSynthConfig(train_products=12, valid_products=4, image_size=32, seed=2))
    train = prepare_retrieval_data(cfg)["train"]
    data = TrainingSet(train)
    words = [w for ws in synthetic_vocab().values() for w in ws]  # swapped texts stay in the vocabulary
    ensure_tiny_encoder(root / "tiny", "chinese_clip", data.texts_for_vocab() + words, TINY)
    rng = random.Random(0)  # stand-ins for mined negatives: any non-positive items
    negs = [rng.sample([j for j in range(len(data.items.ids)) if j not in p], 3) for p in data.pos_sets]
    (root / "negatives.json").write_text(json.dumps(negs))
    return {"train": str(train), "model_dir": str(root / "tiny"), "negatives": str(root / "negatives.json")}


def test_two_processes_give_the_one_process_loss_and_gradients_of_the_merged_batch(inputs, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    res = launch("tests.ddp_retrieval_job:gradients", {**inputs, "out": str(out)}, LaunchConfig(num_processes=2),
                 name="retrieval-ddp")
    assert res["world"] == 2
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    parts = [r["batch"] for r in ranks]
    assert parts[0].queries != parts[1].queries  # each rank its own pairs
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3 and ranks[0]["digest"] == ranks[1]["digest"]  # in step
    assert (out / "train" / "hard_negatives.json").is_file()

    loop, data = job.setup(inputs["train"], inputs["model_dir"], inputs["negatives"], str(tmp_path / "one"))
    assert loop.acc.num_processes == 1
    merged = data.merge(parts)  # the 2B batch one process would train on
    b = job.B
    for r, part in enumerate(parts):  # each rank's own block of the global mask is its local mask
        rows, pairs = slice(r * b, (r + 1) * b), list(range(r * b, (r + 1) * b))
        hard = [2 * b + sum(len(p.items) - b for p in parts[:r]) + k for k in range(len(part.items) - b)]
        assert torch.equal(merged.pos[rows][:, pairs + hard], part.pos)
    assert merged.pos[:b, b:2 * b].any() or merged.pos[b:2 * b, :b].any()  # positives across ranks: masked

    diffs = {}
    for loss, chunk in job.VARIANTS:
        key = f"{loss}/{chunk}"
        ref_loss, ref = job.loss_and_grads(loop, data, job.run_config(inputs["model_dir"], str(tmp_path / "one"),
                                                                       loss, chunk), merged)
        assert ref and "logit_bias" in " ".join(ref) if loss == "sigmoid" else ref
        for rank in ranks:
            got_loss, got = rank["results"][key]
            assert got_loss == pytest.approx(ref_loss, rel=1e-5), key
            assert got.keys() == ref.keys(), key
            for name in ref:
                torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
            seen = diffs.get(key, (0.0, 0.0, 0.0))
            diffs[key] = (max(seen[0], abs(got_loss - ref_loss)),
                          max([seen[1]] + [float((got[n] - ref[n]).abs().max()) for n in ref]),
                          max(float(g.abs().max()) for g in ref.values()))
    print("\nmax |2x B - 1x 2B| of the loss, of any gradient element; largest gradient element:")
    for key, (loss_diff, grad_diff, largest) in diffs.items():
        print(f"  {key:14s} {loss_diff:.1e}  {grad_diff:.1e}  {largest:.2g}")


def test_ddp_launches_are_accepted_and_deepspeed_refused_when_the_config_loads():
    assert RetrievalRunConfig(launch={"num_processes": 8}).launch.num_processes == 8
    RetrievalRunConfig(launch={"num_processes": 8, "config_file": str(ACCELERATE / "multi_gpu_ddp.yaml")})
    with pytest.raises(ValueError, match="selects DEEPSPEED; retrieval training runs on one process or DDP"):
        RetrievalRunConfig(launch={"num_processes": 8, "config_file": str(ACCELERATE / "deepspeed_zero2.yaml")})
