"""Paired image-text data: readers that turn files on disk into (image, captions) records, and the torch datasets and
samplers that feed them to the trainer.

Every reader returns `ImageCaptions` records exactly as the source has them; `clean_records` then drops empty captions
(and images left with none), and `ImageTextDataset` skips images that fail to decode. Nothing here crashes on bad data:
what is dropped is returned as `Skipped(item, reason)` so a run can report it.

Formats (`load_records` picks one from the path, or take `format=`):

    csv / tsv     `image,caption` with a header row, one row per caption
    jsonl         {"image": ..., "caption": ...} or {"image": ..., "captions": [...]} per line
    coco          COCO captions JSON ({"images": [...], "annotations": [...]}), or Karpathy's split JSON
    flickr        Flickr8k/30k token file: `name.jpg#0<TAB>caption`
    webdataset    tar shards (a directory, a .tar, or a brace pattern `shards-{000..009}.tar`); see `write_shards`
    stories       image sequences with one story each: {"images": [...], "story": ...} per line
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmstory.images import MAX_PIXELS, ImageError, ImageProcessor, load_image
from mmstory.text import split_sentences

FORMATS = ("csv", "jsonl", "coco", "flickr", "webdataset", "stories")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class TarMember:
    """An image stored inside a tar shard, read by offset so shards need no unpacking."""

    shard: Path
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


ImageRef = Path | TarMember


@dataclass
class ImageCaptions:
    """One image and all of its reference captions."""

    image: ImageRef
    captions: list[str] = field(default_factory=list)


@dataclass
class ImageStory:
    """An ordered sequence of images told as one story (a string, or one segment per image)."""

    images: list[Path]
    story: str | list[str]


@dataclass(frozen=True)
class Skipped:
    """A data item that was left out, and why (for the run report)."""

    item: str
    reason: str


# --------------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------------
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
    path = _existing(path)
    root = Path(image_root) if image_root is not None else path.parent / "images"
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    grouped: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with 'image' and 'caption' columns, got {reader.fieldnames}")
        for row in reader:
            grouped.setdefault(row["image"], []).append(row["caption"] or "")
    return _select(grouped, root, split, path)


def read_jsonl_captions(path: str | Path, image_root: str | Path | None = None,
                        split: str | Path | None = None) -> list[ImageCaptions]:
    """One JSON object per line with `image` and `caption` (a string) or `captions` (a list)."""
    path = _existing(path)
    grouped: dict[str, list[str]] = {}
    for number, row in _jsonl_rows(path):
        if "image" not in row or not ("caption" in row or "captions" in row):
            raise ValueError(f"{path}:{number}: expected 'image' and 'caption' or 'captions', got {sorted(row)}")
        captions = row["captions"] if "captions" in row else [row["caption"]]
        grouped.setdefault(str(row["image"]), []).extend(str(c or "") for c in captions)
    return _select(grouped, _default_root(path, image_root), split, path)


def read_coco_captions(path: str | Path, image_root: str | Path | None = None,
                       split: str | Path | None = None) -> list[ImageCaptions]:
    """COCO captions JSON (`images` + `annotations`), or Karpathy's split file (`images[].sentences`).

    For Karpathy's file `split` may also name a split ("train", "val", "test", "restval"); otherwise it is a list file.
    """
    path = _existing(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: not a COCO captions file (no 'images' list)")
    grouped: dict[str, list[str]] = {}
    if "annotations" in data:
        names = {image["id"]: image["file_name"] for image in data["images"]}
        for image in data["images"]:
            grouped[image["file_name"]] = []
        for ann in data["annotations"]:
            if ann["image_id"] not in names:
                raise ValueError(f"{path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
            grouped[names[ann["image_id"]]].append(str(ann.get("caption") or ""))
        return _select(grouped, _default_root(path, image_root), split, path)
    wanted = str(split) if split is not None and not Path(split).is_file() else None
    for image in data["images"]:
        if wanted is not None and image.get("split") != wanted:
            continue
        name = "/".join(p for p in (image.get("filepath"), image["filename"]) if p)
        grouped[name] = [str(s.get("raw", " ".join(s.get("tokens", [])))) for s in image.get("sentences", [])]
    if wanted is not None and not grouped:
        raise ValueError(f"{path}: no images in split {wanted!r}")
    return _select(grouped, _default_root(path, image_root), None if wanted else split, path)


def read_flickr_tokens(path: str | Path, image_root: str | Path | None = None,
                       split: str | Path | None = None) -> list[ImageCaptions]:
    """Flickr8k/30k token file: `image.jpg#<n><TAB>caption` per line."""
    path = _existing(path)
    grouped: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            raise ValueError(f"{path}:{number}: expected 'image.jpg#n<TAB>caption', got {line[:80]!r}")
        grouped.setdefault(key.rsplit("#", 1)[0].strip(), []).append(caption)
    return _select(grouped, _default_root(path, image_root), split, path)


def read_webdataset(urls: str | Path | Sequence[str | Path], split: str | Path | None = None) -> list[ImageCaptions]:
    """WebDataset tar shards: samples grouped by key (webdataset's naming rule), image by extension, captions from
    `.json` (`captions` or `caption`) or else `.txt` (one caption per line).

    The shards are indexed once by their tar headers so images can be read at random (for a deterministic shuffle and
    exact resume) without unpacking anything, so shards must be uncompressed `.tar` files. `urls` is a directory of
    `*.tar`, a file, a brace pattern, or a list.
    An image is named by the `image` field of its `.json` when present (so the source's split lists still apply),
    else by `<key>.<ext>`.
    """
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import base_plus_ext

    shards = _shard_paths(urls, expand_urls)
    records = []
    for shard in shards:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is not None:
                    samples.setdefault(key, {})[ext.lower()] = info
            for key, files in samples.items():
                ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                if ext is None:
                    continue
                meta = _tar_json(tar, files)
                name = str(meta.get("image") or f"{key}.{ext}")
                member = TarMember(shard, files[ext].offset_data, files[ext].size, name)
                records.append(ImageCaptions(member, _tar_captions(tar, files, meta)))
    if not records:
        raise ValueError(f"no image samples found in {len(shards)} shard(s): {[str(s) for s in shards[:3]]}")
    if split is not None:
        keep = set(read_split(split))
        records = [r for r in records if r.image.name in keep]
    return records


def read_stories(path: str | Path, image_root: str | Path | None = None) -> list[ImageStory]:
    """Image sequences, one JSON object per line: {"images": [...], "story": "..." or one segment per image}."""
    path = _existing(path)
    root = _default_root(path, image_root)
    stories = []
    for number, row in _jsonl_rows(path):
        if not isinstance(row.get("images"), list) or not row["images"] or "story" not in row:
            raise ValueError(f"{path}:{number}: expected a non-empty 'images' list and a 'story'")
        story = row["story"]
        if isinstance(story, list) and len(story) != len(row["images"]):
            raise ValueError(f"{path}:{number}: {len(story)} story segments for {len(row['images'])} images")
        stories.append(ImageStory([root / name for name in row["images"]], story))
    return stories


def story_to_pairs(story: ImageStory) -> list[ImageCaptions]:
    """One (image, text) pair per picture, for caption-style training: a beat per picture, in order.

    A story given as one segment per image pairs them directly; a single text is split into sentences that are dealt
    out to the images in order, in contiguous runs of (nearly) equal length.
    """
    if isinstance(story.story, list):
        return [ImageCaptions(image, [str(text)]) for image, text in zip(story.images, story.story)]
    sentences = split_sentences(str(story.story), keep_closers=True)
    bounds = np.linspace(0, len(sentences), len(story.images) + 1).round().astype(int)
    return [ImageCaptions(image, [" ".join(sentences[a:b])]) for image, a, b in zip(story.images, bounds, bounds[1:])]


def detect_format(path: str | Path) -> str:
    """Guess a source's format from its name, and for JSON/JSONL from its first record."""
    text = str(path)
    p = Path(path)
    if "{" in text or p.suffix.lower() == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return "webdataset"
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab"):
        return "csv"
    if suffix == ".jsonl":
        for _, row in _jsonl_rows(_existing(p)):
            return "stories" if "images" in row else "jsonl"
        raise ValueError(f"{p}: the file has no records")
    if suffix == ".json":
        return "coco"
    if suffix == ".txt" or p.name.endswith(".token"):
        first = next((line for line in _existing(p).read_text(encoding="utf-8").splitlines() if line.strip()), "")
        if "\t" in first and "#" in first.split("\t", 1)[0]:
            return "flickr"
    raise ValueError(f"cannot tell the format of {p}; pass format= one of {', '.join(FORMATS)}")


def load_records(path: str | Path, format: str | None = None, split: str | Path | None = None,
                 image_root: str | Path | None = None, limit: int | None = None) -> list[ImageCaptions]:
    """Read any supported source into (image, captions) records; stories become one pair per picture.

    `split` is a file listing image names to keep (or a Karpathy split name); `limit` keeps the first N images.
    """
    fmt = format or detect_format(path)
    if fmt == "csv":
        records = read_csv_captions(path, image_root, split)
    elif fmt == "jsonl":
        records = read_jsonl_captions(path, image_root, split)
    elif fmt == "coco":
        records = read_coco_captions(path, image_root, split)
    elif fmt == "flickr":
        records = read_flickr_tokens(path, image_root, split)
    elif fmt == "webdataset":
        records = read_webdataset(path, split)
    elif fmt == "stories":
        records = [pair for story in read_stories(path, image_root) for pair in story_to_pairs(story)]
        if split is not None:
            keep = set(read_split(split))
            records = [r for r in records if r.image.name in keep]
    else:
        raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    return records[:limit] if limit is not None else records


def clean_records(records: Sequence[ImageCaptions]) -> tuple[list[ImageCaptions], list[Skipped]]:
    """Drop empty or whitespace-only captions, and images left with none; report each drop."""
    kept, skipped = [], []
    for record in records:
        captions = []
        for number, caption in enumerate(record.captions):
            if caption is None or not str(caption).strip():
                skipped.append(Skipped(f"{item_name(record.image)} caption #{number}", "empty caption"))
            else:
                captions.append(str(caption).strip())
        if captions:
            kept.append(ImageCaptions(record.image, captions))
        else:
            skipped.append(Skipped(item_name(record.image), "no non-empty caption"))
    return kept, skipped


def records_fingerprint(records: Sequence[ImageCaptions]) -> str:
    """A short hash of a record list, to notice when a resumed run reads different data."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(item_name(record.image).encode())
        digest.update(b"\0".join(c.encode() for c in record.captions))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# Writing WebDataset shards
# --------------------------------------------------------------------------------------------------------------------
def write_shards(records: Sequence[ImageCaptions], out_dir: str | Path, maxcount: int = 1000,
                 maxsize: float = 1e9) -> tuple[list[Path], list[Skipped]]:
    """Write records as WebDataset shards (`shard-000000.tar`, ...) with webdataset's ShardWriter.

    Each sample holds the original image bytes (not re-encoded), `.txt` (captions, one per line, as open_clip reads the
    first) and `.json` ({"image": original name, "captions": [...]}). Files that cannot be read are skipped.
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")):
        raise FileExistsError(f"{out} already holds shards; write to an empty directory")
    skipped = []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for index, record in enumerate(records):
            try:
                data = read_image_bytes(record.image)
            except OSError as err:
                skipped.append(Skipped(item_name(record.image), f"unreadable file ({err.strerror or err})"))
                continue
            ext = Path(record.image.name).suffix.lower().lstrip(".") or "jpg"
            ext = "jpg" if ext == "jpeg" or ext not in IMAGE_EXTENSIONS else ext
            sink.write({"__key__": f"{index:09d}", ext: data,
                        "txt": "\n".join(c.replace("\n", " ") for c in record.captions),
                        "json": {"image": record.image.name, "captions": list(record.captions)}})
    return sorted(out.glob("shard-*.tar")), skipped


# --------------------------------------------------------------------------------------------------------------------
# Images by reference
# --------------------------------------------------------------------------------------------------------------------
def item_name(image: ImageRef) -> str:
    return str(image)


def read_image_bytes(image: ImageRef) -> bytes:
    if isinstance(image, TarMember):
        with image.shard.open("rb") as handle:
            handle.seek(image.offset)
            return handle.read(image.size)
    return Path(image).read_bytes()


def open_image(image: ImageRef, max_pixels: int = MAX_PIXELS):
    """Decode a file or tar member into RGB (see `mmstory.images.load_image`); raises ImageError when unusable."""
    if isinstance(image, TarMember):
        try:
            data = read_image_bytes(image)
        except OSError as err:
            raise ImageError(f"{image}: cannot read the shard ({err})") from err
        return load_image(data, max_pixels=max_pixels, name=str(image))
    return load_image(image, max_pixels=max_pixels)


def skip_reason(err: ImageError, image: ImageRef) -> str:
    """The ImageError message without the leading file name (the report names the item separately)."""
    message = str(err)
    prefix = f"{image}: "
    return message[len(prefix):] if message.startswith(prefix) else message


# --------------------------------------------------------------------------------------------------------------------
# Datasets and the sampler that fixes the data order
# --------------------------------------------------------------------------------------------------------------------
Key = tuple[int, int]  # (record index, caption index)


class ImageTextDataset(Dataset):
    """Decoded (pixels, caption) pairs, indexed by (record, caption) keys from `EpochBatchSampler`.

    An image that fails to decode is replaced by the next record that does, so batches keep their size (a short batch
    on one rank would stall the others in distributed training) and the replacement is the same on every run, which
    keeps resumed runs exact. The failure travels with the sample as `Skipped`, for the report.
    """

    def __init__(self, records: Sequence[ImageCaptions], processor: ImageProcessor, max_pixels: int = MAX_PIXELS):
        if not records:
            raise ValueError("the dataset has no records")
        self.records = list(records)
        self.processor = processor
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Key) -> dict:
        index, caption_index = key
        skipped = []
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                pixels = self.processor(open_image(record.image, self.max_pixels))
            except ImageError as err:
                skipped.append(Skipped(item_name(record.image), skip_reason(err, record.image)))
                continue
            caption = record.captions[caption_index % len(record.captions)]
            return {"pixel_values": pixels, "caption": caption, "name": item_name(record.image), "skipped": skipped}
        raise RuntimeError(f"none of the {len(self.records)} images could be decoded; first error: {skipped[0].reason}")


def collate_pixels(samples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "captions": [s["caption"] for s in samples], "names": [s["name"] for s in samples],
            "skipped": [item for s in samples for item in s["skipped"]]}


class EpochBatchSampler:
    """This rank's batches of (record, caption) keys for one epoch, in a deterministic order.

    Training: the order is a permutation seeded by (seed, epoch), cut into global batches of `batch_size * world_size`
    (the incomplete last one dropped, so every rank runs the same number of equal batches); rank r takes the r-th
    slice of each. `caption_sampling="random"` visits every image once per epoch with one caption picked by
    (seed, epoch, image); "all" visits every (image, caption) pair. `start` skips that many batches: a resumed run
    continues exactly where the checkpoint left off.

    Evaluation (`shuffle=False`): consecutive images with their first caption, in batches of `batch_size` (the last
    may be short); rank r takes batches r, r + world_size, ...
    """

    def __init__(self, caption_counts: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, caption_sampling: str = "random",
                 start: int = 0):
        if caption_sampling not in ("random", "all"):
            raise ValueError(f"caption_sampling must be 'random' or 'all', got {caption_sampling!r}")
        self.counts = list(caption_counts)
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.caption_sampling, self.start = caption_sampling, start

    def _batches(self) -> list[list[Key]]:
        if not self.shuffle:
            keys = [(i, 0) for i in range(len(self.counts))]
            batches = [keys[i: i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
            return batches[self.rank:: self.world_size]
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.caption_sampling == "all":
            keys = [(i, j) for i, count in enumerate(self.counts) for j in range(count)]
        else:
            choices = rng.integers(0, np.iinfo(np.int64).max, size=len(self.counts))
            keys = [(i, int(c % count)) for i, (count, c) in enumerate(zip(self.counts, choices))]
        order = rng.permutation(len(keys))
        width = self.batch_size * self.world_size
        batches = []
        for start in range(0, len(order) - width + 1, width):
            mine = order[start + self.rank * self.batch_size: start + (self.rank + 1) * self.batch_size]
            batches.append([keys[i] for i in mine])
        return batches

    def __iter__(self) -> Iterator[list[Key]]:
        yield from self._batches()[self.start:]

    def __len__(self) -> int:
        return max(len(self._batches()) - self.start, 0)

    def batches_per_epoch(self) -> int:
        return len(self._batches())


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    return path


def _default_root(path: Path, image_root: str | Path | None) -> Path:
    """Image names resolve against `image_root`, else an `images/` folder beside the file, else its folder."""
    if image_root is not None:
        return Path(image_root)
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


def _select(grouped: dict[str, list[str]], root: Path, split: str | Path | None, source: Path) -> list[ImageCaptions]:
    names = read_split(split) if split is not None else list(grouped)
    missing = [n for n in names if n not in grouped]
    if missing:
        raise ValueError(f"{len(missing)} image(s) in the split have no captions in {source}, e.g. {missing[:3]}")
    return [ImageCaptions(root / name, grouped[name]) for name in names]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            yield number, row


def _shard_paths(urls, expand_urls) -> list[Path]:
    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        shards = sorted(Path(urls).glob("*.tar"))
    elif isinstance(urls, (str, Path)):
        shards = [Path(u) for u in expand_urls(str(urls))]
    else:
        shards = [Path(u) for u in urls]
    missing = [s for s in shards if not s.is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"WebDataset shards not found: {[str(s) for s in missing[:3]] or str(urls)}")
    return shards


def _tar_json(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo]) -> dict:
    if "json" not in files:
        return {}
    meta = json.load(io.TextIOWrapper(tar.extractfile(files["json"]), encoding="utf-8"))
    return meta if isinstance(meta, dict) else {}


def _tar_captions(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], meta: dict) -> list[str]:
    if "captions" in meta or "caption" in meta:
        captions = meta["captions"] if "captions" in meta else [meta["caption"]]
        return [str(c or "") for c in captions]
    if "txt" in files:
        return tar.extractfile(files["txt"]).read().decode("utf-8").splitlines() or [""]
    return []
