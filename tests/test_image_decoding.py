"""Images are decoded at the size the model needs: a big JPEG by its decoder's DCT scaling (so its full size is never
held), anything else reduced right after decoding, one image of a request at a time and within the request's pixel
budget; and a decompression bomb is refused with the caller's own pixel limit. (RSS under the battery of big images:
scripts/serve_memory.py, which prints the numbers.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmstory.images import MAX_PIXELS, ImageError, load_image, load_images, picture_seed


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    return Image.fromarray(np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], -1).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_a_big_jpeg_is_decoded_at_a_quarter_by_its_decoder():
    """4000x3000: the JPEG decoder's 1/4 scale is the smallest that keeps both sides >= 512, so it decodes 1000x750
    (a full decode reduced afterwards by 3000 // 512 = 5 would give 800x600; before, the full 4000x3000 was kept)."""
    image = load_image(encode(gradient(4000, 3000), "JPEG", quality=80))
    assert image.size == (1000, 750) and image.mode == "RGB"


def test_other_formats_are_reduced_after_decoding_and_keep_their_look():
    big = gradient(2600, 1100)
    image = load_image(encode(big, "PNG"))
    assert image.size == (2600 // 2, 1100 // 2)  # 1100 // 512 = 2
    expected = np.asarray(big.reduce(2), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - expected).max() <= 1


def test_small_images_are_decoded_as_they_are():
    for size in ((640, 480), (512, 512), (300, 2000)):  # 300 is under 2 x 512: nothing to reduce
        for fmt in ("JPEG", "PNG"):
            assert load_image(encode(gradient(*size), fmt)).size == size
    assert load_image(encode(gradient(1500, 1200), "PNG"), min_side=None).size == (1500, 1200)


def test_one_bit_and_palette_images_are_reduced_too():
    for mode in ("1", "P", "I;16"):  # modes Pillow's reduce does not take; 2000 // 512 = 3, rounded up
        assert load_image(encode(gradient(3000, 2000).convert(mode), "PNG")).size == (1000, 667)


def test_exif_orientation_survives_the_reduction():
    image = gradient(3000, 1200)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise for display
    loaded = load_image(encode(image, "JPEG", exif=exif))
    assert loaded.size == (600, 1500)  # (3000x1200 at 1/2) turned upright
    assert load_image(encode(image, "JPEG", exif=exif), min_side=None).size == (1200, 3000)


def test_a_request_has_a_pixel_budget_for_all_its_images():
    """Eight 6000x6000 gradient PNGs (cheap to send) decode to 546x546 each (reduced by 6000 // 512 = 11): well
    within the budget. Images that cannot be reduced (a 512-px-wide panorama) spend it quickly, and the image that
    would overdraw it is refused before it is decoded, naming the budget."""
    squares = [encode(gradient(6000, 6000).convert("L"), "PNG")] * 8
    assert [image.size for image in load_images(squares)] == [(546, 546)] * 8
    panorama = encode(gradient(512, 30000).convert("L"), "PNG")
    with pytest.raises(ImageError, match=r"image 4: the request's images are too large together.*48,000,000"):
        load_images([panorama] * 8, names=[f"image {i + 1}" for i in range(8)])
    assert len(load_images([panorama] * 2, request_pixels=2 * 512 * 30000)) == 2


@pytest.mark.parametrize("limit", [MAX_PIXELS, 1_000_000])
def test_a_bomb_is_refused_with_the_callers_limit_not_pillows(limit):
    """A 20000x20000 PNG is over Pillow's own bomb limit (2 x 89,478,485), which Pillow raises before the caller
    can look at the size: the message still names the caller's limit."""
    from test_serving import huge_png

    with pytest.raises(ImageError) as caught:
        load_image(huge_png(), max_pixels=limit, name="image 1")
    message = str(caught.value)
    assert message == f"image 1: image too large (400,000,000 pixels; the limit is {limit:,})"
    assert "178956970" not in message and "89478485" not in message



def test_picture_seed_mixes_the_seed_with_the_pixels():
    red, blue = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    assert picture_seed(0, [red]) == picture_seed(0, [red.copy()])  # the same photo and seed: the same story
    assert len({picture_seed(0, [red]), picture_seed(0, [blue]), picture_seed(1, [red]),
                picture_seed(0, [red, blue]), picture_seed(0, [blue, red])}) == 5
    assert 0 <= picture_seed(2**40, [red]) < 2**31
