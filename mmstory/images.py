"""Safe image decoding and preprocessing, shared by training data, the Python API, the CLI and the server.

Every way an image can be bad (missing, not an image, truncated, a decompression bomb, an odd mode) becomes an
`ImageError` with a message a person can act on.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

MAX_PIXELS = 40_000_000  # a 40-megapixel photo passes; a 20000x20000 bomb does not
# Images are decoded reduced by the largest whole factor that keeps both sides at least this long (a JPEG by its
# decoder's 1/2, 1/4, 1/8 DCT scaling, so its full size is never held): every encoder squashes the picture to its own
# input (224-336 px) anyway, and twice that is more than its resize needs. Smaller images are decoded as they are.
DECODE_MIN_SIDE = 512
# the pixels of all images of one request together, as decoded (after the reduction above): eight 40-megapixel JPEGs
# decode to about 2.5 Mpx each, while eight PNGs that cannot be reduced would hold 320 Mpx (a gigabyte)
REQUEST_PIXELS = 48_000_000
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names the problem."""


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS, name: str | None = None,
               min_side: int | None = DECODE_MIN_SIDE, budget: PixelBudget | None = None) -> Image.Image:
    """Decode a path, bytes, PIL image or HxWxC array into an RGB PIL image, or raise ImageError.

    `max_pixels` bounds the image's own size (read from the header, before any pixel is decoded). The image is
    reduced as `DECODE_MIN_SIDE` says (`min_side=None`: kept at full size). `budget`: the pixels the request may still
    decode; this image's decoded pixels are taken from it, and an image that would overdraw it fails before it is
    decoded (`load_images` keeps one for a whole request)."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, Image.Image):
        check_size(source, max_pixels, label)
        image = _reduce(source, min_side, budget, label)
    elif isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise ImageError(f"{label}: an image array must be HxW or HxWxC, got shape {source.shape}")
        array = source if source.dtype == np.uint8 else np.clip(source * (255 if source.max() <= 1 else 1), 0, 255)
        image = Image.fromarray(array.astype(np.uint8))
        check_size(image, max_pixels, label)
        image = _reduce(image, min_side, budget, label)
    elif isinstance(source, (bytes, bytearray)):
        image = _decode(io.BytesIO(source), max_pixels, label, min_side, budget)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{label}: no such file")
        with path.open("rb") as handle:
            image = _decode(io.BytesIO(handle.read()), max_pixels, label, min_side, budget)
    else:
        raise ImageError(f"expected an image path, bytes, PIL image or array, got {type(source).__name__}")
    return _to_rgb(image)


def picture_seed(seed: int, pictures: Sequence[Image.Image]) -> int:
    """`seed` mixed with the pictures' pixels: two photos whose captions read the same still get stories of their
    own, and the same photos with the same seed the same story."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for picture in pictures:
        rgb = picture if picture.mode == "RGB" else picture.convert("RGB")  # no full-size copy of an RGB photo
        digest.update(rgb.resize((32, 32)).tobytes())
    return int.from_bytes(digest.digest(), "little") % 2**31


def load_images(sources: Sequence[ImageInput], max_pixels: int = MAX_PIXELS, names: Sequence[str] | None = None,
                request_pixels: int = REQUEST_PIXELS) -> list[Image.Image]:
    """`load_image` for each of one request's images, one at a time (so at most one is ever held at full size),
    within `request_pixels` decoded pixels for all of them together."""
    budget = PixelBudget(request_pixels)
    return [load_image(source, max_pixels, names[i] if names else None, budget=budget)
            for i, source in enumerate(sources)]


def _reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The size `Image.reduce(factor)` gives (it rounds up)."""
    return -(-size[0] // factor), -(-size[1] // factor)


def reduction(size: tuple[int, int], min_side: int | None) -> int:
    """The whole factor an image of `size` is reduced by: the largest that keeps both sides >= `min_side`."""
    return max(1, min(size) // min_side) if min_side else 1


class PixelBudget:
    """The pixels one request may still decode; each image's decoded size is taken from it before it is decoded."""

    def __init__(self, total: int = REQUEST_PIXELS):
        self.total = self.left = total

    def spend(self, size: tuple[int, int], label: str) -> None:
        pixels = size[0] * size[1]
        if pixels > self.left:
            raise ImageError(f"{label}: the request's images are too large together (this one decodes to "
                             f"{size[0]}x{size[1]} pixels; a request may decode {self.total:,} pixels in all and "
                             f"{self.left:,} were left): send fewer or smaller images")
        self.left -= pixels


def _spend(budget: PixelBudget | None, size: tuple[int, int], label: str) -> None:
    if budget is not None:
        budget.spend(size, label)


def _reduce(image: Image.Image, min_side: int | None, budget: PixelBudget | None, label: str) -> Image.Image:
    factor = reduction(image.size, min_side)
    _spend(budget, _reduced_size(image.size, factor), label)
    return _reduced(image, factor)


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    """`image.reduce(factor)` (a box average); modes it does not take (1-bit, palette, 16-bit) become RGB first."""
    if factor <= 1:
        return image
    try:
        return image.reduce(factor)
    except ValueError:
        return _to_rgb(image).reduce(factor)


def _decode(stream: io.BytesIO, max_pixels: int, label: str, min_side: int | None = DECODE_MIN_SIDE,
            budget: PixelBudget | None = None) -> Image.Image:
    if stream.getbuffer().nbytes == 0:
        raise ImageError(f"{label}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            check_size(image, max_pixels, label)  # checked from the header, before decoding any pixels
            transpose = image.getexif().get(ExifTags.Base.Orientation, 1)
            factor = reduction(image.size, min_side)
            if factor > 1 and image.format == "JPEG":  # the decoder scales by 1/2, 1/4 or 1/8 as it decodes
                image.draft(None, (image.size[0] // factor, image.size[1] // factor))
                factor = reduction(image.size, min_side)  # what is left after the decoder's scaling
            _spend(budget, _reduced_size(image.size, factor), label)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise too_large(err, label, max_pixels) from err
    except (OSError, SyntaxError, ValueError) as err:
        detail = str(err)
        if "cannot identify image file" in detail:
            raise ImageError(f"{label}: not a readable image (unknown or unsupported format)") from err
        kind = "truncated or corrupt image" if "truncated" in detail.lower() else "not a readable image"
        raise ImageError(f"{label}: {kind} ({detail})") from err
    return _transpose(_reduced(image, factor), transpose)


def _transpose(image: Image.Image, orientation: int) -> Image.Image:
    """The EXIF orientation applied (as `ImageOps.exif_transpose`, which the reduced copy can no longer read)."""
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return image.transpose(method) if method is not None else image


def too_large(err: Exception, label: str, max_pixels: int) -> ImageError:
    """Pillow's decompression-bomb refusal, told with this caller's own limit rather than Pillow's."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow will open"
    return ImageError(f"{label}: image too large ({size}; the limit is {max_pixels:,})")


def check_size(image: Image.Image, max_pixels: int, label: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{label}: image too large ({width}x{height} = {width * height:,} pixels; "
                         f"the limit is {max_pixels:,})")
    if width == 0 or height == 0:
        raise ImageError(f"{label}: image has no pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten alpha onto white and convert palette, grayscale, CMYK, 16-bit modes to RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        array = 255 * (array - array.min()) / max(float(array.max() - array.min()), 1.0)
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """Resize to the encoder's square input and normalise; the same for training and inference."""

    def __init__(self, image_size: int, mean: list[float], std: list[float]):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (tensor - self.mean) / self.std

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])
