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
