"""The one image function: bytes (or an array) -> the model's uint8 H x W x C input.

Training's data sources call these same functions, so a photo is seen identically in training and
serving. Choices, in the order they are applied:

* EXIF orientation is applied (phones store rotated pixels plus a tag).
* JPEG draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the DCT while keeping the image at least
  ``DRAFT_FACTOR`` times the target size, so a 3008x2000 photo never decodes at full size.
* Transparency (RGBA, LA, palette with a transparent colour) is composited onto white: the bin
  photographs items on a white board, so white is the neutral background.
* CMYK and YCbCr go through Pillow's RGB conversion; 16/32-bit grey is scaled to 8 bits by its
  full range; grey is replicated to RGB for colour models and RGB is converted to luminance (L) for
  grey models.
* The whole frame is resized to the model's H x W (no crop: the object may sit anywhere), with
  Pillow's antialiasing bilinear filter.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DRAFT_FACTOR = 4
# Files a class-folder tree counts as photos (training's folder sources and the promotion gate's audit tree).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_MAX_PIXELS = 50_000_000

# Pillow warns (and past 2x raises) on huge images through a process-wide limit; we check the pixel
# count ourselves with the caller's limit, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An input that cannot become a model input; ``code`` and ``status`` map to the API's error body."""

    def __init__(self, code: str, message: str, status: int):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def image_files(folder: Path) -> list[Path]:
    """The photos directly in ``folder``, sorted, so every reader of a class folder sees the same list."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse and fully decode ``data``; raise ImageError for anything that is not one still image."""
    if not data:
        raise ImageError("empty_body", "the upload is empty", 400)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "the upload is not an image Pillow can read", 400) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("not_an_image", f"the upload could not be parsed as an image: {exc}", 400) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            413,
        )
    if getattr(image, "n_frames", 1) > 1:
        raise ImageError("animated_image", "animated images are not supported; send one still frame", 415)
    return image


def to_model_input(image: Image.Image, height: int, width: int, channels: int) -> np.ndarray:
    """Orient, convert and resize a decoded (or lazily opened) image to uint8 ``height x width x C``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if image.format == "JPEG":
        image.draft("L" if channels == 1 else "RGB", (width * DRAFT_FACTOR, height * DRAFT_FACTOR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright photo
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("truncated_image", f"the image data is truncated or corrupt: {exc}", 400) from None
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(height, width, channels)


def load_image(data: bytes, height: int, width: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of any still image -> uint8 H x W x C model input (the service's and training's path)."""
    return to_model_input(open_image(data, max_pixels), height, width, channels)


def load_image_file(path: str | Path, height: int, width: int, channels: int) -> np.ndarray:
    """A photo on disk through exactly the upload path."""
    return load_image(Path(path).read_bytes(), height, width, channels)


def array_to_model_input(array: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """An in-memory uint8 H x W [x C] array (npz data sets) through the same conversion and resize."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return to_model_input(Image.fromarray(array), height, width, channels)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode == mode:
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _wide_grey_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert(mode)


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit or float grey -> 8-bit by the format's full range (16-bit: >> 8; float: 0..1 or 0..255)."""
    values = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 1.0
        eight = np.clip(values * scale, 0, 255)
    elif image.mode == "I" and int(values.max(initial=0)) > 65535:
        eight = values.astype(np.float64) / 2**24
    else:
        eight = values.astype(np.float64) / 256.0
    return Image.fromarray(np.clip(eight, 0, 255).astype(np.uint8), mode="L")
