"""Readers for every supported format, WebDataset shards, caption cleaning, the epoch sampler and bad-image skipping."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_photo

from mmstory.data import (
    EpochBatchSampler,
    ImageCaptions,
    ImageStory,
    ImageTextDataset,
    TarMember,
    clean_records,
    collate_pixels,
    detect_format,
    load_records,
    read_coco_captions,
    read_csv_captions,
    read_flickr_tokens,
    read_image_bytes,
    read_jsonl_captions,
    read_stories,
    read_webdataset,
    story_to_pairs,
    write_shards,
)
from mmstory.images import ImageProcessor


def _photos(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        names.append(f"p{i}.jpg")
        make_photo(i, size=(32, 24)).save(folder / names[-1])
    return names


def _as_pairs(records: list[ImageCaptions]) -> list[tuple[str, list[str]]]:
    return [(r.image.name, r.captions) for r in records]


def test_csv_and_tsv(photo_dir: Path):
    records = read_csv_captions(photo_dir / "captions.csv")
    assert len(records) == 8 and all(len(r.captions) == 2 for r in records)
    assert records[0].image == photo_dir / "images" / "img0.jpg" and records[0].image.is_file()
    assert _as_pairs(load_records(photo_dir / "captions.csv")) == _as_pairs(records)

    tsv = photo_dir / "captions.tsv"
    tsv.write_text("image\tcaption\nimg1.png\ta, with a comma\nimg1.png\tsecond\n")
    assert detect_format(tsv) == "csv"
    assert _as_pairs(load_records(tsv)) == [("img1.png", ["a, with a comma", "second"])]

    (photo_dir / "split.txt").write_text("# dev images\nimg3.png\n\nimg0.jpg\n")
    assert [r.image.name for r in load_records(photo_dir / "captions.csv", split=photo_dir / "split.txt")] == [
        "img3.png", "img0.jpg"]
    (photo_dir / "bad-split.txt").write_text("nope.jpg\n")
    with pytest.raises(ValueError, match="no captions"):
        load_records(photo_dir / "captions.csv", split=photo_dir / "bad-split.txt")


def test_jsonl_captions(tmp_path: Path):
    _photos(tmp_path / "images", 2)
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "p0.jpg", "caption": "one"}\n\n{"image": "p1.jpg", "captions": ["two", "three"]}\n'
                    '{"image": "p0.jpg", "caption": "four"}\n')
    assert detect_format(path) == "jsonl"
    records = read_jsonl_captions(path)
    assert _as_pairs(records) == [("p0.jpg", ["one", "four"]), ("p1.jpg", ["two", "three"])]
    assert records[0].image == tmp_path / "images" / "p0.jpg"
    assert read_jsonl_captions(path, image_root="/elsewhere")[1].image == Path("/elsewhere/p1.jpg")
    (tmp_path / "broken.jsonl").write_text('{"image": "p0.jpg"}\n')
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        read_jsonl_captions(tmp_path / "broken.jsonl")


def test_coco_and_karpathy_json(tmp_path: Path):
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"id": 1, "image_id": 9, "caption": "b first"}, {"id": 2, "image_id": 7, "caption": "a"},
                            {"id": 3, "image_id": 9, "caption": "b second"}]}
    (tmp_path / "captions_train.json").write_text(json.dumps(coco))
    records = load_records(tmp_path / "captions_train.json", image_root=tmp_path / "train2017")
    assert _as_pairs(records) == [("a.jpg", ["a"]), ("b.jpg", ["b first", "b second"])]
    assert records[1].image == tmp_path / "train2017" / "b.jpg"

    karpathy = {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "x one"}, {"raw": "x 2"}]},
        {"filepath": "train2014", "filename": "y.jpg", "split": "train", "sentences": [{"tokens": ["y", "one"]}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    assert _as_pairs(read_coco_captions(tmp_path / "dataset_coco.json", split="test")) == [("x.jpg", ["x one", "x 2"])]
    train = read_coco_captions(tmp_path / "dataset_coco.json", image_root=tmp_path, split="train")
    assert train[0].image == tmp_path / "train2014" / "y.jpg" and train[0].captions == ["y one"]
    with pytest.raises(ValueError, match="no images in split"):
        read_coco_captions(tmp_path / "dataset_coco.json", split="restval")


def test_flickr_token_file(tmp_path: Path):
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("1000_a.jpg#0\tA child climbs stairs .\n1000_a.jpg#1\tA girl in pink .\n"
                    "2000_b.jpg#0\tTwo dogs .\n")
    assert detect_format(path) == "flickr"
    records = read_flickr_tokens(path, image_root=tmp_path / "Flicker8k_Dataset")
    assert _as_pairs(records) == [("1000_a.jpg", ["A child climbs stairs .", "A girl in pink ."]),
                                  ("2000_b.jpg", ["Two dogs ."])]
    (tmp_path / "Flickr_8k.devImages.txt").write_text("2000_b.jpg\n")
    assert len(load_records(path, split=tmp_path / "Flickr_8k.devImages.txt")) == 1


def test_stories(tmp_path: Path):
    path = tmp_path / "albums.jsonl"
    path.write_text(json.dumps({"images": ["a.jpg", "b.jpg"], "story": ["We left.", "We arrived."]}) + "\n"
                    + json.dumps({"images": ["c.jpg", "d.jpg", "e.jpg"],
                                  "story": "One. Two! Three? Four. Five."}) + "\n")
    assert detect_format(path) == "stories"
    stories = read_stories(path)
    assert stories[0] == ImageStory([tmp_path / "a.jpg", tmp_path / "b.jpg"], ["We left.", "We arrived."])
    pairs = story_to_pairs(stories[1])
    assert [p.captions[0] for p in pairs] == ["One. Two!", "Three?", "Four. Five."]
    records = load_records(path)
    assert [r.image.name for r in records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"images": ["a.jpg"], "story": ["x", "y"]}) + "\n")
    with pytest.raises(ValueError, match="2 story segments for 1 images"):
        read_stories(tmp_path / "bad.jsonl")


def test_webdataset_shards_round_trip(photo_dir: Path, tmp_path: Path):
    import webdataset as wds

    source = read_csv_captions(photo_dir / "captions.csv")
    source.append(ImageCaptions(photo_dir / "images" / "gone.jpg", ["missing file"]))
    shards, skipped = write_shards(source, tmp_path / "shards", maxcount=3)
    assert len(shards) == 3 and [s.item for s in skipped] == [str(photo_dir / "images" / "gone.jpg")]
    with pytest.raises(FileExistsError):
        write_shards(source, tmp_path / "shards")

    for spec in (tmp_path / "shards", str(tmp_path / "shards" / "shard-{000000..000002}.tar"), shards):
        records = read_webdataset(spec)
        assert _as_pairs(records) == _as_pairs(source[:8])
    assert detect_format(tmp_path / "shards") == "webdataset"
    record = load_records(tmp_path / "shards")[5]
    assert isinstance(record.image, TarMember) and record.image.name == "img5.png"
    assert read_image_bytes(record.image) == (photo_dir / "images" / "img5.png").read_bytes()

    # The webdataset package itself reads the shards we wrote: same keys, captions and bytes.
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False))
    assert len(samples) == 8 and {"jpg", "png"} & set(samples[1])
    assert json.loads(samples[1]["json"])["captions"] == source[1].captions
    assert samples[1]["txt"].decode().splitlines() == source[1].captions

    (tmp_path / "keep.txt").write_text("img2.jpg\nimg7.png\n")
    assert [r.image.name for r in read_webdataset(tmp_path / "shards", split=tmp_path / "keep.txt")] == [
        "img2.jpg", "img7.png"]


def test_make_shards_script(photo_dir: Path, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(photo_dir / "captions.csv"), "--out", str(tmp_path / "out"), "--maxcount", "5"]) == 0
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 2
    assert len(load_records(tmp_path / "out")) == 8


def test_detect_format_rejects_unknown(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("just some text\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(tmp_path / "notes.txt", format="parquet")


def test_clean_records_drops_empty_captions():
    records = [ImageCaptions(Path("a.jpg"), ["fine", "  ", "", " padded "]), ImageCaptions(Path("b.jpg"), [" \t"])]
    kept, skipped = clean_records(records)
    assert _as_pairs(kept) == [("a.jpg", ["fine", "padded"])]
    assert [(s.item, s.reason) for s in skipped] == [("a.jpg caption #1", "empty caption"),
                                                     ("a.jpg caption #2", "empty caption"),
                                                     ("b.jpg caption #0", "empty caption"),
                                                     ("b.jpg", "no non-empty caption")]


def test_epoch_sampler_is_deterministic_sharded_and_resumable():
    counts = [5, 1, 2, 3, 1, 4, 2, 2, 1, 3, 2]

    def batches(**kw):
        return list(EpochBatchSampler(counts, 2, seed=3, **kw))

    assert batches(epoch=0) == batches(epoch=0) and batches(epoch=0) != batches(epoch=1)
    assert batches(epoch=1, start=2) == batches(epoch=1)[2:]
    full = batches(epoch=4)
    assert len(full) == 5 and sorted(i for b in full for i, _ in b) == sorted(set(i for b in full for i, _ in b))
    assert all(c < counts[i] for b in full for i, c in b)
    ranks = [batches(epoch=4, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and all(len(b) == 2 for r in ranks for b in r)
    seen = [key for r in ranks for b in r for key in b]
    assert len(set(seen)) == 8  # disjoint across ranks; the 3 left over make no full global batch
    pairs = [key for b in batches(epoch=0, caption_sampling="all") for key in b]
    assert len(pairs) == sum(counts) // 2 * 2 and len(set(pairs)) == len(pairs)
    evaluation = [list(EpochBatchSampler(counts, 4, rank=r, world_size=2, shuffle=False)) for r in (0, 1)]
    assert sorted(key for r in evaluation for b in r for key in b) == [(i, 0) for i in range(len(counts))]
    with pytest.raises(ValueError):
        EpochBatchSampler(counts, 2, caption_sampling="first")


def test_dataset_replaces_undecodable_images(tmp_path: Path):
    names = _photos(tmp_path / "images", 3)
    (tmp_path / "images" / "text.jpg").write_text("not an image")
    records = [ImageCaptions(tmp_path / "images" / n, [f"caption {n}"]) for n in names]
    records.insert(1, ImageCaptions(tmp_path / "images" / "text.jpg", ["bad"]))
    records.insert(2, ImageCaptions(tmp_path / "images" / "missing.jpg", ["gone"]))
    dataset = ImageTextDataset(records, ImageProcessor(16, [0.5] * 3, [0.5] * 3))
    sample = dataset[(1, 0)]
    assert sample["name"] == str(tmp_path / "images" / "p1.jpg") and sample["caption"] == "caption p1.jpg"
    reasons = {s.item: s.reason for s in sample["skipped"]}
    assert reasons[str(tmp_path / "images" / "missing.jpg")] == "no such file"
    assert reasons[str(tmp_path / "images" / "text.jpg")].startswith("not a readable image")
    batch = collate_pixels([dataset[(0, 0)], sample])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and len(batch["skipped"]) == 2
    assert np.isfinite(batch["pixel_values"].numpy()).all()


def test_flickr8k_captions_and_splits(flickr8k: Path):
    train = load_records(flickr8k / "captions.csv", split=flickr8k / "train.txt")
    dev = load_records(flickr8k / "captions.csv", split=flickr8k / "dev.txt", limit=10)
    assert len(train) == 6000 and all(len(r.captions) == 5 for r in train)
    assert len(dev) == 10 and not {r.image for r in dev} & {r.image for r in train}
    assert train[0].image.is_file()
