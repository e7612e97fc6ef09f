"""The DataLoader data path: worker processes prepare the very micro-batches the stage builds
inline (same losses and weights, step by step), and an interrupted run with workers resumes
exactly; the prompt cache leaves rows over its size limit out."""
import json

import pytest
import torch

from ecomcap.config import FinetuneConfig
from ecomcap.training import microbatches
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.data import ShardImages
from ecomcap.training.prompt_cache import PromptCache
from ecomcap.training.sft import run_sft
from tests.test_sft import GEN, _cfg, _final_weights


def _losses(res):
    run = res.final_dir.parent
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def loaders(monkeypatch):
    """Records each DataLoader the loop makes (worker count), around the real class."""
    made, real = [], microbatches.DataLoader

    def spy(*a, **kw):
        made.append(kw["num_workers"])
        return real(*a, **kw)

    monkeypatch.setattr(microbatches, "DataLoader", spy)
    return made


def test_workers_give_the_inline_batches_and_resume_exactly(tiny_model_cfg, small_data, tmp_path, loaders):
    ft = FinetuneConfig(strategy="full")
    kw = dict(eval_every=0, grad_accum=2, max_steps=5, save_every=2)
    inline = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "a", data_workers=0, **kw), GEN)
    assert loaders == []
    workers = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "b", data_workers=2, **kw), GEN)
    assert loaders == [2]
    assert _losses(workers) == _losses(inline)  # bit-identical batches -> identical losses
    assert workers.param_digest == inline.param_digest
    with pytest.raises(InterruptedError):
        run_sft(small_data["train"], None, tiny_model_cfg, ft,
                _cfg(tmp_path / "c", data_workers=2, stop_after_steps=3, **kw), GEN)
    resumed = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "c", data_workers=2, **kw), GEN)
    assert resumed.resumed_from == 2 and loaders == [2, 2, 2]
    a, b = _final_weights(inline.final_dir), _final_weights(resumed.final_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_the_prompt_cache_leaves_rows_over_the_size_limit_out(tiny_model_cfg, small_data):
    from ecomcap.modeling.processor import load_processor

    data = ShardImages(small_data["train"])
    builder = PromptBuilder(load_processor(tiny_model_cfg.name_or_path), tiny_model_cfg.prompt)
    load = lambda rows: [data.image(r) for r in rows]  # noqa: E731
    small = PromptCache(builder, 2**30, max_row_bytes=1)
    want = builder.prompts(load([0, 1]))
    got = small.prompts([0, 1], load)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert small.too_large == 2 and "2 rows over the row size limit" in small.summary()
    roomy = PromptCache(builder, 2**30, max_row_bytes=2**20)
    roomy.prompts([0, 1], load)
    roomy.prompts([0, 1], load)
    assert roomy.hits == 2 and roomy.too_large == 0
