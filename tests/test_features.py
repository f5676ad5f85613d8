"""The feature cache: encodes once, matches the encoder, and is invalidated by a changed file or encoder (not by a
copied, moved or touched one)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_photo

from mmstory.data import ImageCaptions, write_shards
from mmstory.images import ImageProcessor, load_image
from mmstory.train.features import FeatureCache, collate_features, file_identity


@pytest.fixture
def images(tmp_path: Path) -> list[ImageCaptions]:
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i in range(5):
        make_photo(i, size=(40, 30)).save(folder / f"p{i}.png")
        records.append(ImageCaptions(folder / f"p{i}.png", [f"caption {i}"]))
    return records


def _direct(model, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    vision = model.vision
    pixels = ImageProcessor(vision.image_size, vision.mean, vision.std)(load_image(path))[None]
    with torch.no_grad():
        tokens, pooled = vision(pixels)
    return tokens[0], pooled[0]


def test_cache_encodes_once_and_matches_the_encoder(tiny_model, images, tmp_path: Path):
    cache = FeatureCache(tmp_path / "cache", tiny_model.vision, tiny_model.config.vision.spec, shard_size=2)
    built = cache.build(images, batch_size=2, progress=False)
    assert (built.encoded, built.reused, built.skipped) == (5, 0, [])
    assert len(list(cache.directory.glob("shard-*.safetensors"))) == 3  # shard_size=2: 2 + 2 + 1
    again = cache.build(images, batch_size=2, progress=False)
    assert (again.encoded, again.reused) == (0, 5) and again.locations == built.locations

    dataset = again.dataset()
    batch = collate_features([dataset[(3, 0)], dataset[(1, 0)]])
    n, d = tiny_model.vision.num_tokens, tiny_model.vision.token_dim
    assert batch["image_tokens"].shape == (2, n, d) and batch["image_tokens"].dtype == torch.float32
    assert batch["captions"] == ["caption 3", "caption 1"]
    tokens, pooled = _direct(tiny_model, images[3].image)
    torch.testing.assert_close(batch["image_tokens"][0], tokens, atol=2e-2, rtol=2e-3)  # stored as fp16
    torch.testing.assert_close(batch["image_pooled"][0], pooled, atol=2e-2, rtol=2e-3)
    # The loss from cached features equals the loss from pixels (up to fp16 storage).
    captions = ["caption 3", "caption 1"]
    tiny_model.train()  # frozen parts stay in eval mode
    with torch.no_grad():
        cached = tiny_model(captions=captions, image_tokens=batch["image_tokens"], image_pooled=batch["image_pooled"])
        vision = tiny_model.vision
        processor = ImageProcessor(vision.image_size, vision.mean, vision.std)
        pixels = processor.batch([load_image(images[3].image), load_image(images[1].image)])
        direct = tiny_model(pixels, captions)
    assert abs(cached.loss.item() - direct.loss.item()) < 1e-2


def test_a_changed_file_is_encoded_again(tiny_model, images, tmp_path: Path):
    cache = FeatureCache(tmp_path / "cache", tiny_model.vision, tiny_model.config.vision.spec)
    first = cache.build(images, progress=False)
    before = first.dataset().features(2)[1].clone()
    identity = file_identity(images[2].image)
    make_photo(99, size=(40, 30)).save(images[2].image)
    stat = images[2].image.stat()
    os.utime(images[2].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_identity(images[2].image) != identity
    second = cache.build(images, progress=False)
    assert (second.encoded, second.reused) == (1, 4)
    after = second.dataset().features(2)[1]
    assert not torch.allclose(before.float(), after.float())
    torch.testing.assert_close(after.float(), _direct(tiny_model, images[2].image)[1], atol=2e-2, rtol=2e-3)


def test_touched_and_copied_files_are_not_encoded_again(tiny_model, images, tmp_path: Path):
    cache = FeatureCache(tmp_path / "cache", tiny_model.vision, tiny_model.config.vision.spec)
    first = cache.build(images, progress=False)
    for record in images:  # what a restore or a copy without -p does: new mtimes, same bytes
        stat = record.image.stat()
        os.utime(record.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    copy = tmp_path / "copied"
    shutil.copytree(images[0].image.parent, copy)
    moved = [ImageCaptions(copy / r.image.name, r.captions) for r in images]
    for records in (images, moved):
        again = cache.build(records, progress=False)
        assert (again.encoded, again.reused) == (0, 5) and again.locations == first.locations
    # each path's digest is remembered with the size and mtime it was taken at: one entry per path, current
    digests = json.loads((cache.directory / "digests.json").read_text())
    assert len(digests) == 10 and digests[str(images[0].image.resolve())][1] == images[0].image.stat().st_mtime_ns


def test_a_changed_encoder_gets_its_own_cache(tiny_model, images, tmp_path: Path):
    spec = tiny_model.config.vision.spec
    cache = FeatureCache(tmp_path / "cache", tiny_model.vision, spec)
    cache.build(images, progress=False)
    assert FeatureCache(tmp_path / "cache", tiny_model.vision, spec).directory == cache.directory
    with torch.no_grad():
        next(tiny_model.vision.parameters()).add_(0.01)
    changed = FeatureCache(tmp_path / "cache", tiny_model.vision, spec)
    assert changed.directory != cache.directory and changed.build(images, progress=False).encoded == 5
    other_dtype = FeatureCache(tmp_path / "cache", tiny_model.vision, spec, dtype=torch.float32)
    assert other_dtype.directory not in (cache.directory, changed.directory)
    assert other_dtype.build(images, progress=False).dataset().features(0)[0].dtype == torch.float32
    assert FeatureCache(tmp_path / "cache", tiny_model.vision, "timm:other").directory != changed.directory


def test_bad_images_are_reported_and_remembered(tiny_model, images, tmp_path: Path):
    folder = images[0].image.parent
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    (folder / "folder.png").mkdir()  # exists, but has no bytes to read
    bad = ("empty.png", "text.png", "missing.png", "folder.png")
    records = images + [ImageCaptions(folder / n, ["x"]) for n in bad]
    cache = FeatureCache(tmp_path / "cache", tiny_model.vision, tiny_model.config.vision.spec)
    first = cache.build(records, batch_size=3, progress=False)
    reasons = {s.item: s.reason for s in first.skipped}
    assert reasons == {str(folder / "missing.png"): "no such file", str(folder / "empty.png"): "the file is empty",
                       str(folder / "text.png"): reasons[str(folder / "text.png")],
                       str(folder / "folder.png"): "unreadable: Is a directory"}
    assert reasons[str(folder / "text.png")].startswith("not a readable image")
    assert [r.image.name for r in first.records] == [f"p{i}.png" for i in range(5)]
    second = cache.build(records, progress=False)  # bad files are not decoded again, but still reported
    assert second.encoded == 0 and {s.item: s.reason for s in second.skipped} == reasons


def test_tar_members_and_interrupted_writes(tiny_model, images, tmp_path: Path):
    shards, _ = write_shards(images, tmp_path / "shards", maxcount=2)
    from mmstory.data import read_webdataset

    members = read_webdataset(tmp_path / "shards")
    cache = FeatureCache(tmp_path / "cache", tiny_model.vision, tiny_model.config.vision.spec)
    built = cache.build(members, progress=False)
    assert built.encoded == 5 and len({file_identity(m.image) for m in members}) == 5
    torch.testing.assert_close(built.dataset().features(4)[1].float(), _direct(tiny_model, images[4].image)[1],
                               atol=2e-2, rtol=2e-3)
    (cache.directory / ".tmp-deadbeef.safetensors").write_bytes(b"half a shard")  # what a kill leaves behind
    assert cache.build(members, progress=False).encoded == 0


def test_text_features_encode_each_caption_once_and_match_the_encoder(tiny_model, tmp_path: Path):
    from mmstory.train.features import text_features

    tiny_model.eval()
    captions = ["a dog runs", "two children play in the snow", "a dog runs", "a red car"]
    fingerprint = {"spec": tiny_model.config.text.spec, "weights": "w1"}
    first = text_features(tmp_path, tiny_model.encode_text, fingerprint, captions, batch_size=2,
                          dtype=torch.float32, progress=False)
    assert first.encoded == 3 and len(first.lookup) == 3
    with torch.no_grad():
        direct = tiny_model.encode_text(["two children play in the snow"])[0]
    torch.testing.assert_close(first["two children play in the snow"], direct, atol=1e-5, rtol=1e-4)

    again = text_features(tmp_path, tiny_model.encode_text, fingerprint, list(reversed(captions)),
                          dtype=torch.float32, progress=False)
    assert again.encoded == 0 and torch.equal(again["a red car"], first["a red car"])
    changed = text_features(tmp_path, tiny_model.encode_text, {**fingerprint, "weights": "w2"}, captions,
                            dtype=torch.float32, progress=False)
    assert changed.encoded == 3  # another encoder: its own file
