"""Example photos that ship with a dependency (scikit-image), for the CLI, the demo and the tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# name -> skimage.data function; real photographs under permissive licences (see skimage.data's docs)
EXAMPLES = {
    "chelsea": "chelsea",  # a tabby cat
    "coffee": "coffee",  # a cup of coffee on a saucer
    "astronaut": "astronaut",  # Eileen Collins in her flight suit
    "rocket": "rocket",  # a rocket on the launch pad
    "motorcycle": "stereo_motorcycle",  # a motorcycle in a workshop (left view)
}


def example_image(name: str) -> Image.Image:
    if name not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}; available: {', '.join(EXAMPLES)}")
    from skimage import data

    array = getattr(data, EXAMPLES[name])()
    if isinstance(array, tuple):  # stereo pairs and the like
        array = array[0]
    return Image.fromarray(array).convert("RGB")


def write_examples(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in EXAMPLES:
        path = directory / f"{name}.jpg"
        example_image(name).save(path, quality=92)
        paths.append(path)
    return paths
