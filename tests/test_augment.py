"""SFT image augmentation: deterministic per (seed, step, image), different across steps, the
image itself when off, hue and flips off by default, each op switchable."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from ecomcap.data.augment import AugmentConfig, augment


@pytest.fixture
def image():
    img = Image.new("RGB", (96, 64), (240, 240, 235))
    ImageDraw.Draw(img).rectangle((30, 15, 66, 50), fill=(200, 20, 30))  # a red product on a light background
    ImageDraw.Draw(img).text((34, 20), "NOVA", fill=(255, 255, 255))
    return img


def test_off_returns_the_image_itself(image):
    assert augment(image, AugmentConfig(), 3, 0) is image


def test_same_step_same_pixels_other_step_other_pixels(image):
    cfg = AugmentConfig(enabled=True, seed=7)
    a, b = augment(image, cfg, 5, 1), augment(image, cfg, 5, 1)
    assert a.tobytes() == b.tobytes() and a.size == image.size
    assert augment(image, cfg, 6, 1).tobytes() != a.tobytes()
    assert augment(image, cfg, 5, 2).tobytes() != a.tobytes()
    assert augment(image, AugmentConfig(enabled=True, seed=8), 5, 1).tobytes() != a.tobytes()


def test_global_random_state_does_not_matter(image):
    import random

    cfg = AugmentConfig(enabled=True)
    random.seed(1)
    np.random.seed(1)
    a = augment(image, cfg, 2, 0)
    random.seed(2)
    np.random.seed(2)
    assert augment(image, cfg, 2, 0).tobytes() == a.tobytes()


def test_hue_and_flip_are_off_by_default_and_the_config_says_why():
    cfg = AugmentConfig()
    assert cfg.hue == 0 and cfg.hflip is False
    assert "红色" in AugmentConfig.model_fields["hue"].description
    assert "brand" in AugmentConfig.model_fields["hflip"].description


def test_colour_only_keeps_the_red_red(image):
    """Brightness/contrast/saturation jitter without hue: the product's dominant hue stays red."""
    cfg = AugmentConfig(enabled=True, rotate_deg=0, translate=0, scale=0, crop_min_area=1)
    for step in range(20):
        px = np.asarray(augment(image, cfg, step, 0).convert("HSV"))[32, 48]
        assert px[0] < 15 or px[0] > 240, (step, px)  # hue near 0 (red)


def test_every_op_switches_off(image):
    none = AugmentConfig(enabled=True, rotate_deg=0, translate=0, scale=0, crop_min_area=1, brightness=0,
                         contrast=0, saturation=0)
    assert augment(image, none, 4, 0).tobytes() == image.tobytes()


def test_sft_augments_per_draw_and_resumes_exactly_with_workers(tiny_model_cfg, small_data, tmp_path, caplog):
    """Augmenting SFT: workers give the inline run's weights, an interrupted run resumes to them, and
    the draws differ from the run without augmentation (the decoded images are cached)."""
    import json
    import logging

    import torch

    from ecomcap.config import FinetuneConfig
    from ecomcap.training.sft import run_sft
    from tests.test_sft import GEN, _cfg, _final_weights

    ft = FinetuneConfig(strategy="full")
    aug = AugmentConfig(enabled=True, seed=3)
    kw = dict(eval_every=0, max_steps=6, save_every=2, augment=aug)
    with caplog.at_level(logging.INFO, logger="ecomcap.training.sft"):
        inline = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "a", data_workers=0, **kw), GEN)
    assert "decoded-image cache (augmenting)" in caplog.text
    with pytest.raises(InterruptedError):
        run_sft(small_data["train"], None, tiny_model_cfg, ft,
                _cfg(tmp_path / "b", data_workers=2, stop_after_steps=3, **kw), GEN)
    resumed = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "b", data_workers=2, **kw), GEN)
    assert resumed.resumed_from == 2
    a, b = _final_weights(inline.final_dir), _final_weights(resumed.final_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    plain = run_sft(small_data["train"], None, tiny_model_cfg, ft,
                    _cfg(tmp_path / "c", data_workers=0, **{**kw, "augment": AugmentConfig()}), GEN)

    def losses(res):
        return [json.loads(line)["loss"] for line in (res.final_dir.parent / "metrics.jsonl").read_text().splitlines()]

    assert losses(plain)[0] == pytest.approx(losses(inline)[0], abs=1.0)  # same data, same scale
    assert losses(plain) != losses(inline)
    assert plain.param_digest != inline.param_digest


def test_the_decoded_image_cache_serves_repeats_within_its_budget(image):
    from ecomcap.training.prompt_cache import ImageCache

    cache, loads = ImageCache(max_bytes=96 * 64 * 3), []
    load = lambda: loads.append(1) or image.copy()  # noqa: E731
    first = cache.get(0, load)
    assert cache.get(0, load) is first and len(loads) == 1 and cache.hits == 1
    cache.get(1, load)
    cache.get(1, load)  # over the budget: decoded again, not held
    assert len(loads) == 3 and "2 images from memory" not in cache.summary()
