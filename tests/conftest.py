"""Shared test helpers: tiny hand-built MUGE sources (independent of the synthetic generator)."""
import io
import os

import pytest
from PIL import Image

os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")


def make_image(color="red", size=(64, 48), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bomb_png() -> bytes:
    """A real PNG declaring 12000x12000 pixels (tiny compressed): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000), 0).save(buf, "PNG")
    return buf.getvalue()
