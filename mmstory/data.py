"""Paired image-text data: readers that turn files on disk into (image, captions) records."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImageCaptions:
    """One image and all of its reference captions."""

    image: Path
    captions: list[str] = field(default_factory=list)


def read_split(path: str | Path) -> list[str]:
    """A split list: one image file name per line (blank lines and #-comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_csv_captions(path: str | Path, image_root: str | Path | None = None,
                      split: str | Path | None = None) -> list[ImageCaptions]:
    """`image,caption` CSV (or TSV by extension) with a header row; several rows per image are grouped in order.

    `image_root` defaults to an `images/` folder beside the file; `split` keeps only the images listed in that file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent / "images"
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    grouped: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with 'image' and 'caption' columns, got {reader.fieldnames}")
        for row in reader:
            grouped.setdefault(row["image"], []).append(row["caption"] or "")
    names = read_split(split) if split is not None else list(grouped)
    missing = [n for n in names if n not in grouped]
    if missing:
        raise ValueError(f"{len(missing)} image(s) in the split have no captions in {path}, e.g. {missing[:3]}")
    return [ImageCaptions(root / name, grouped[name]) for name in names]
