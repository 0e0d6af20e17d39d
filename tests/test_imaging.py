"""The one image function on the input kinds a bin (or a user) sends: EXIF-rotated, palette, RGBA,
CMYK, 16-bit grey, huge and broken files. Real TrashNet photos are the starting point."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.imaging import ImageError, array_to_model_input, load_image, load_image_file, open_image
from tests.service_support import animated_gif, huge_png

SIZE = (32, 32, 3)


@pytest.fixture(scope="module")
def photo(trashnet_dir: Path) -> Image.Image:
    return Image.open(trashnet_dir / "glass" / "glass10.jpg").convert("RGB")


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_real_photo_shape_and_type(trashnet_dir: Path) -> None:
    array = load_image_file(trashnet_dir / "metal" / "metal1.jpg", *SIZE)
    assert array.shape == SIZE and array.dtype == np.uint8
    assert 10 < array.mean() < 250 and array.std() > 5  # a real picture, not a constant


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    upright = load_image(encode(photo, "JPEG", quality=95), *SIZE)
    # Stored turned 90 degrees counter-clockwise, tagged "rotate 90 CW to display" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    rotated = load_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), *SIZE)
    ignored = load_image(encode(stored, "JPEG", quality=95), *SIZE)
    assert diff(rotated, upright) < 3, "EXIF orientation should restore the upright photo"
    assert diff(ignored, upright) > 3 * diff(rotated, upright), "the test photo must not be rotation-invariant"


def test_palette_image_matches_rgb(photo: Image.Image) -> None:
    rgb = load_image(encode(photo, "PNG"), *SIZE)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    assert palette.mode == "P"
    assert diff(load_image(encode(palette, "PNG"), *SIZE), rgb) < 6


def test_palette_transparency_is_white() -> None:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))
    array = load_image(encode(image, "PNG", transparency=0), *SIZE)
    assert (array[:, :15] == 255).all()  # transparent black -> white board
    assert (array[:, 17:] == [255, 0, 0]).all()


def test_rgba_composited_on_white() -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (32, 0, 64, 64))
    array = load_image(encode(image, "PNG"), *SIZE)
    assert (array[:, :15] == 255).all()
    assert (array[:, 17:] == [200, 30, 30]).all()


def test_cmyk_jpeg_matches_rgb(photo: Image.Image) -> None:
    rgb = load_image(encode(photo, "JPEG", quality=95), *SIZE)
    cmyk_bytes = encode(photo.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk_bytes)).mode == "CMYK"
    assert diff(load_image(cmyk_bytes, *SIZE), rgb) < 6


def test_16_bit_grey_scaled_to_8_bit(photo: Image.Image) -> None:
    grey = photo.convert("L")
    wide = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # full 16-bit range
    assert wide.mode.startswith("I;16")
    eight = load_image(encode(grey, "PNG"), *SIZE)
    sixteen = load_image(encode(wide, "PNG"), *SIZE)
    assert np.abs(sixteen.astype(int) - eight.astype(int)).max() <= 1
    assert (sixteen[..., 0] == sixteen[..., 1]).all() and (sixteen[..., 1] == sixteen[..., 2]).all()


def test_grey_model_gets_one_channel(photo: Image.Image) -> None:
    array = load_image(encode(photo, "JPEG"), 28, 28, 1)
    assert array.shape == (28, 28, 1)


def test_large_jpeg_uses_draft_and_matches_full_decode(photo: Image.Image) -> None:
    big = encode(photo.resize((3008, 2256)), "JPEG", quality=90)
    start = time.perf_counter()
    fast = load_image(big, *SIZE)
    elapsed = time.perf_counter() - start
    full = np.asarray(Image.open(io.BytesIO(big)).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert diff(fast, full) < 4
    assert elapsed < 1.0


def test_array_path_equals_lossless_file_path(photo: Image.Image) -> None:
    array = np.asarray(photo.resize((64, 48)))
    assert (array_to_model_input(array, *SIZE) == load_image(encode(Image.fromarray(array), "PNG"), *SIZE)).all()


@pytest.mark.parametrize(
    ("name", "make", "code", "status"),
    [
        ("empty", lambda photo: b"", "empty_body", 400),
        ("text", lambda photo: b"this is not an image\n" * 20, "not_an_image", 400),
        ("truncated", lambda photo: encode(photo, "JPEG")[:5000], "truncated_image", 400),
        ("animated", lambda photo: animated_gif(), "animated_image", 415),
        ("huge", lambda photo: huge_png(), "too_many_pixels", 413),
    ],
)
def test_bad_inputs_raise_image_error(photo: Image.Image, name: str, make, code: str, status: int) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(make(photo), *SIZE)
    assert (caught.value.code, caught.value.status) == (code, status)


def test_pixel_limit_checked_before_decoding() -> None:
    start = time.perf_counter()
    with pytest.raises(ImageError):
        open_image(huge_png(), max_pixels=50_000_000)
    assert time.perf_counter() - start < 2.0
