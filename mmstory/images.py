"""Safe image decoding and preprocessing, shared by training data, the Python API, the CLI and the server.

Every way an image can be bad (missing, not an image, truncated, a decompression bomb, an odd mode) becomes an
`ImageError` with a message a person can act on.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000  # a 40-megapixel photo passes; a 20000x20000 bomb does not
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names the problem."""


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode a path, bytes, PIL image or HxWxC array into an RGB PIL image, or raise ImageError."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, Image.Image):
        image = source
        check_size(image, max_pixels, label)
    elif isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise ImageError(f"{label}: an image array must be HxW or HxWxC, got shape {source.shape}")
        array = source if source.dtype == np.uint8 else np.clip(source * (255 if source.max() <= 1 else 1), 0, 255)
        image = Image.fromarray(array.astype(np.uint8))
        check_size(image, max_pixels, label)
    elif isinstance(source, (bytes, bytearray)):
        image = _decode(io.BytesIO(source), max_pixels, label)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{label}: no such file")
        with path.open("rb") as handle:
            image = _decode(io.BytesIO(handle.read()), max_pixels, label)
    else:
        raise ImageError(f"expected an image path, bytes, PIL image or array, got {type(source).__name__}")
    return _to_rgb(image)


def _decode(stream: io.BytesIO, max_pixels: int, label: str) -> Image.Image:
    if stream.getbuffer().nbytes == 0:
        raise ImageError(f"{label}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            check_size(image, max_pixels, label)  # checked from the header, before decoding any pixels
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{label}: image too large ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        detail = str(err)
        if "cannot identify image file" in detail:
            raise ImageError(f"{label}: not a readable image (unknown or unsupported format)") from err
        kind = "truncated or corrupt image" if "truncated" in detail.lower() else "not a readable image"
        raise ImageError(f"{label}: {kind} ({detail})") from err
    return ImageOps.exif_transpose(image)


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
