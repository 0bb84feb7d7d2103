"""Hostile pictures: broken EXIF, strips and needles within the pixel bound, and the daemon's
memory for the worst picture it accepts."""

from __future__ import annotations

import io
import warnings
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.jobs.errors import ErrorCode, RequestError
from agent.jobs.init_images import MAX_ASPECT, MAX_SIDE, normalize
from agent.settings import Settings
from tests.conftest import generate
from tests.pictures import b64, deep_png, png_header_only

SETTINGS = Settings()
MIB = 2**20


@cache
def camera_picture(fmt: str) -> bytes:
    """A small picture with the EXIF a phone writes: orientation, maker, resolution, date."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter
    exif[0x010F] = "Camera"
    exif[0x0110] = "Model X"
    exif[0x011A] = 72.0
    exif[0x011B] = 72.0
    exif[0x0128] = 2
    exif[0x0131] = "fw 1.0"
    exif[0x0132] = "2026:01:01 10:00:00"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def with_flips(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    """Return ``data`` with bytes of its EXIF block replaced: (offset into the block, value)."""
    start = max(data.find(b"Exif"), data.find(b"EXIF"))  # JPEG's APP1, WebP's chunk
    changed = bytearray(data)
    for offset, value in flips:
        changed[start + offset % (len(data) - start)] = value
    return bytes(changed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["JPEG", "WEBP"]),
    flips=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), min_size=1, max_size=4),
)
# Found by 12,000 random flips (78 of them broke it): each made Pillow's EXIF code raise a
# TypeError, struct.error or AttributeError, answered as an internal error with a traceback.
@example(fmt="JPEG", flips=[(65, 86)])  # struct.error: required argument is not an integer
@example(fmt="JPEG", flips=[(101, 84)])  # struct.error: required argument is not a float
@example(fmt="JPEG", flips=[(65, 13)])  # 'IFDRational' object has no attribute 'encode'
@example(fmt="JPEG", flips=[(29, 27)])  # bad operand type for abs(): 'str'
@example(fmt="WEBP", flips=[(81, 4)])  # 'H' format requires 0 <= number <= 65535
@example(fmt="WEBP", flips=[(57, 1)])  # bad operand type for abs(): 'bytes'
@example(fmt="WEBP", flips=[(199, 12)])  # 'float' object has no attribute 'encode'
def test_a_picture_whose_exif_cannot_be_read_is_used_without_it_or_refused(fmt, flips):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns of every corrupt tag
        try:
            result = normalize(with_flips(camera_picture(fmt), flips), 0, 0, SETTINGS)
        except RequestError as error:
            assert error.code is ErrorCode.BAD_IMAGE
            return
    width, height = result.size
    assert width % 8 == 0
    assert height % 8 == 0
    assert result.png.startswith(b"\x89PNG")


def test_an_unbroken_phone_picture_is_still_turned_upright():
    result = normalize(camera_picture("JPEG"), 0, 0, SETTINGS)
    width, height = result.size
    assert height > width  # 64x48 stored, orientation 6: 48 wide, 64 high


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((16_777_216, 1), f"a side may be at most {MAX_SIDE}"),
        ((1, 16_777_216), f"a side may be at most {MAX_SIDE}"),
        ((8192, 1000), f"differ {MAX_ASPECT}:1 at most"),
        ((5000, 5000), "the limit is 16777216 pixels"),
    ],
    ids=["strip", "needle", "ribbon", "over-the-pixel-bound"],
)
def test_a_shape_no_camera_makes_is_refused_before_it_is_decoded(size, reason):
    with pytest.raises(RequestError, match=reason) as refused:
        normalize(png_header_only(*size), 0, 0, SETTINGS)
    assert refused.value.code is ErrorCode.BAD_IMAGE


def test_the_worst_picture_accepted_is_decoded_within_bounded_memory(shared_agent, client):
    worst = deep_png()
    with Image.open(io.BytesIO(worst)) as opened:
        assert opened.size == (4096, 4096)
    pid = shared_agent.process.pid
    status = Path(f"/proc/{pid}/status")

    def memory(field: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(field))
        return int(line.split()[1]) * 1024

    generate(client, shared_agent, init_image=b64(worst), width=512, height=512)  # warm
    before = memory("VmRSS:")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from here
    for seed in range(4):
        result = generate(
            client, shared_agent, init_image=b64(worst), width=512, height=512, seed=seed
        )
        assert result["status"] == "ok", result
    peak, after = memory("VmHWM:") - before, memory("VmRSS:") - before
    print(
        f"4 pictures of 4096x4096 RGBA16: daemon peak +{peak / MIB:.0f} MiB,"
        f" after +{after / MIB:.0f} MiB"
    )
    assert peak <= 120 * MIB
    assert after <= 16 * MIB
