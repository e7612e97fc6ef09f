"""Generation: batched equals one-by-one, every id exactly once, post-processing."""
import json

from ecomcap.config import GenerateConfig, PostprocessConfig
from ecomcap.inference.batch import generate_for_dataset
from ecomcap.inference.generate import caption_images, size_batches
from ecomcap.inference.postprocess import collapse_repeats, postprocess
from ecomcap.modeling.load import load_base
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.data import ShardImages


def test_batched_beam_search_equals_one_by_one(tiny_model_cfg, small_data):
    model, processor = load_base(tiny_model_cfg)
    pb = PromptBuilder(processor, tiny_model_cfg.prompt)
    data = ShardImages(small_data["valid"])
    images = [data.image(i) for i in range(len(data))]
    cfg = GenerateConfig(num_beams=3, max_new_tokens=12, batch_size=8)
    batched = caption_images(model, pb, images, cfg, progress=False)
    single = caption_images(model, pb, images, cfg.model_copy(update={"batch_size": 1}), progress=False)
    assert batched == single


def test_every_id_exactly_once(tiny_model_cfg, small_data, tmp_path):
    model, processor = load_base(tiny_model_cfg)
    out = tmp_path / "caption_gen.jsonl"
    preds = generate_for_dataset(model, processor, tiny_model_cfg.prompt, small_data["test"], out,
                                 GenerateConfig(num_beams=1, max_new_tokens=6, batch_size=4))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ids = [r["image_id"] for r in rows]
    want = [json.loads(line)["image_id"] for line in (small_data["raw"] / "IC_test.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(want) and len(set(ids)) == len(ids) == len(preds)
    assert all(isinstance(r["text"], str) for r in rows)


def test_size_batches_groups_similar_sizes():
    sizes = [(100, 100), (500, 500), (101, 100), (499, 500), (100, 99)]
    assert size_batches(sizes, 2) == [[4, 0], [2, 3], [1]]


def test_postprocess_rules():
    assert postprocess("<|im_end|> 红色 条纹 T恤 简约百搭简约百搭 ２０㎝") == "红色条纹T恤简约百搭20cm"
    assert collapse_repeats("好好好看的10000元XXL裙子") == "好看的10000元XXL裙子"
    off = PostprocessConfig(strip=False, collapse_repeats=False, normalize_width=False)
    assert postprocess(" 红色红色 ", off) == " 红色红色 "
