"""The image folder's retention limits and deterministic encoding."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from agent.images import ImageStore, encode_image, file_name


def test_retention_by_bytes_keeps_the_newest(tmp_path):
    store = ImageStore(tmp_path, keep_count=100, keep_bytes=250)
    for index in range(4):
        store.save(f"job{index}.png", b"x" * 100)
        os.utime(tmp_path / f"job{index}.png", (index, index))  # distinct, ordered mtimes
    store.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job2.png", "job3.png"]


def test_a_name_the_agent_would_not_write_is_refused(tmp_path):
    store = ImageStore(tmp_path, keep_count=10, keep_bytes=10_000)
    with pytest.raises(ValueError, match="not an image file name"):
        store.save("../escape.png", b"x")


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_encoding_is_deterministic(image_format):
    image = Image.effect_noise((64, 48), 50).convert("RGB")
    first = encode_image(image, image_format, 90)
    assert first == encode_image(image, image_format, 90)
    assert file_name("abc", image_format).startswith("abc.")
