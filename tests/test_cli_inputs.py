"""The CLI checks its inputs before it loads a model: missing files, directories, unreadable images, bad settings
and unusable devices exit with code 2 and one line on stderr; `--device` reaches the model load; `mmstory caption`
expands directories and globs, skips what it cannot read and writes JSON lines via a temporary file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_photo, requires_packaged

from mmstory import cli
from mmstory.generation import MAX_IMAGES, StoryTeller


class ModelLoaded(AssertionError):
    """Raised by the patched loader: the CLI got as far as loading a model."""


@pytest.fixture
def no_model(monkeypatch):
    """StoryTeller.from_pretrained (and eval's StoryModel.from_pretrained) raise: a test passing with it proves the
    CLI answered without loading any model. Records each attempted load's arguments."""
    from mmstory.model import StoryModel

    calls = []

    def refuse(name, **kwargs):
        calls.append((name, kwargs))
        raise ModelLoaded(f"the model {name!r} was loaded")

    monkeypatch.setattr(StoryTeller, "from_pretrained", staticmethod(refuse))
    monkeypatch.setattr(StoryModel, "from_pretrained", staticmethod(refuse))
    return calls


class FakeTeller:
    """Stands in for a loaded StoryTeller: one caption string per image. Used only to test the CLI's own file
    handling (expansion, skipping, batching, output files); the slow test below captions with the real model."""

    def __init__(self, name, **kwargs):
        self.name, self.kwargs, self.batches = name, kwargs, []

    def caption(self, images, num_beams=None, batch_size=32):
        images = list(images)
        assert all(image.mode == "RGB" for image in images)  # decoded by the CLI before captioning
        self.batches.append(len(images))
        return [f"a picture {image.size[0]}x{image.size[1]}" for image in images]


@pytest.fixture
def fake_teller(monkeypatch):
    made = []

    def load(name, **kwargs):
        made.append(FakeTeller(name, **kwargs))
        return made[-1]

    monkeypatch.setattr(StoryTeller, "from_pretrained", staticmethod(load))
    return made


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    make_photo(1).save(path)
    return path


@pytest.fixture
def mixed_dir(tmp_path) -> Path:
    """5 generated images (sizes 40+i x 30), one corrupt JPEG, one text file named .png, one non-image file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(5):
        make_photo(i, size=(40 + i, 30)).save(folder / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}")
    good = (folder / "img0.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[:20] + b"\x00" * 200)  # a JPEG header, then garbage
    (folder / "notes.png").write_text("not a picture at all\n")
    (folder / "readme.txt").write_text("not an image extension: ignored\n")
    (folder / "sub").mkdir()
    make_photo(9).save(folder / "sub" / "deep.jpg")
    return folder


# --- checks before the model loads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["story"], ["story", "--prompt", "what is this?"], ["answer", "-q", "what?"],
                                     ["caption"]])
def test_a_missing_file_is_reported_without_loading_the_model(no_model, tmp_path, command, capsys):
    missing = tmp_path / "nothing.jpg"
    assert cli.main([command[0], str(missing), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such file" in err
    assert no_model == []


def test_story_of_a_directory_says_it_is_a_directory(no_model, tmp_path, capsys):
    assert cli.main(["story", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is a directory" in err and "no such file" not in err
    assert no_model == []


@pytest.mark.parametrize("args, message", [
    (["--length", "5"], "word budget"),
    (["--length", "epic"], "unknown length"),
    (["--style", "opera"], "unknown style"),
    (["--tone", "positive", "--audience", "children", "--top-p", "1.5"], "top_p"),
    (["--num-candidates", "9"], "num_candidates"),
    (["--continue-from", "no-such-story.txt"], "no such file"),
])
def test_bad_story_settings_fail_before_the_model_loads(no_model, photo, args, message, capsys):
    assert cli.main(["story", str(photo), *args]) == 2
    assert message in capsys.readouterr().err
    assert no_model == []


def test_story_flags_are_decodings_fields_with_its_defaults():
    """The story command's decoding flags are generated from `Decoding`: one flag per field, the same default."""
    import argparse
    import dataclasses

    from mmstory.generation import Decoding

    parser = argparse.ArgumentParser()
    cli._add_story_args(parser)
    args = parser.parse_args([])
    for field in dataclasses.fields(Decoding):
        assert getattr(args, field.name) == field.default, field.name
    flags = parser.parse_args(["--top-k", "7", "--top-p", "0.5", "--seed", "3", "--no-do-sample"])
    assert (flags.top_k, flags.top_p, flags.seed, flags.do_sample) == (7, 0.5, 3, False)


def test_unreadable_and_surplus_images_fail_before_the_model_loads(no_model, tmp_path, photo, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    assert cli.main(["story", str(photo), str(text)]) == 2
    assert f"{text}: not a readable image" in capsys.readouterr().err
    assert cli.main(["story", *[str(photo)] * (MAX_IMAGES + 1)]) == 2
    assert f"at most {MAX_IMAGES}" in capsys.readouterr().err
    assert no_model == []


@pytest.mark.parametrize("command", [["story"], ["answer", "-q", "what is it?"], ["caption"]])
@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"),
                                             ("cuda:99", "cuda:99"), ("mps", "'mps' is not supported")])
def test_an_unusable_device_fails_before_the_model_loads(no_model, photo, command, device, message, capsys):
    assert cli.main([command[0], str(photo), *command[1:], "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mmstory: ")
    assert no_model == []


def test_eval_refuses_an_unusable_device_before_loading(no_model, photo_dir, capsys):
    assert cli.main(["eval", "--data", str(photo_dir), "--split", "all", "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    assert no_model == []


# --- --device reaches the model load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["story"], ["answer", "-q", "what is it?"], ["caption"]])
def test_device_cpu_is_passed_to_from_pretrained(no_model, photo, command):
    with pytest.raises(ModelLoaded):
        cli.main([command[0], str(photo), *command[1:], "--device", "cpu", "--model", "some-model"])
    [(name, kwargs)] = no_model
    assert name == "some-model" and str(kwargs["device"]) == "cpu"


def test_eval_passes_the_device_to_the_evaluation(monkeypatch, photo_dir, capsys):
    from mmstory.eval import evaluate as evaluation
    from mmstory.model import StoryModel

    seen = {}
    monkeypatch.setattr(StoryModel, "from_pretrained", staticmethod(lambda name: "a model"))

    def fake_evaluate(model, records, **kwargs):
        seen.update(kwargs, model=model)
        raise ValueError("stop here")

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    assert cli.main(["eval", "--data", str(photo_dir), "--split", "all", "--device", "cpu"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen["model"] == "a model" and str(seen["device"]) == "cpu"


# --- mmstory caption: the CLI's own file handling (FakeTeller) --------------------------------------------------------
def test_caption_a_directory_skips_unreadable_files_and_writes_jsonl(fake_teller, mixed_dir, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    out.write_text("an older file, replaced only at the end\n")
    assert cli.main(["caption", str(mixed_dir), "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    [teller] = fake_teller
    assert str(teller.kwargs["device"]) == "cpu"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == [f"img{i}.{'jpg' if i % 2 == 0 else 'png'}" for i in range(5)]
    assert [r["caption"] for r in rows] == [f"a picture {40 + i}x30" for i in range(5)]
    assert not Path(str(out) + ".tmp").exists()
    assert sum(teller.batches) == 5 and max(teller.batches) <= 2
    err = capsys.readouterr().err
    skips = [line for line in err.splitlines() if line.startswith("mmstory: skipped")]
    assert len(skips) == 2
    assert any("corrupt.jpg" in line for line in skips) and any("notes.png" in line for line in skips)
    assert "readme.txt" not in err and "deep.jpg" not in err
    assert "captioned 5 images, skipped 2 unreadable" in err
    assert "img/s" in err  # the tqdm progress bar


def test_caption_recursive_globs_and_stdout(fake_teller, mixed_dir, capsys):
    assert cli.main(["caption", str(mixed_dir), "--recursive"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[-1].startswith(str(mixed_dir / "sub" / "deep.jpg") + "\t")
    assert cli.main(["caption", str(mixed_dir / "img*.png"), str(mixed_dir / "img1.png"),
                     str(mixed_dir / "nothing-*.jpg")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{mixed_dir / 'img1.png'}\ta picture 41x30",
                                         f"{mixed_dir / 'img3.png'}\ta picture 43x30"]  # no repeats
    assert "nothing-*.jpg: no file matches" in captured.err
    assert "captioned 2 images, skipped 1 unreadable" in captured.err


def test_caption_with_nothing_readable_exits_2_without_loading(no_model, tmp_path, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    out = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(tmp_path), str(tmp_path / "gone.jpg"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "empty.png: the file is empty" in err and "gone.jpg: no such file" in err
    assert "captioned 0 images, skipped 3 unreadable" in err
    assert not out.exists() and no_model == []
    assert cli.main(["caption", str(tmp_path / "empty-dir-*")]) == 2
    assert cli.main(["caption", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert no_model == []


def test_caption_keeps_what_it_wrote_when_it_crashes(monkeypatch, mixed_dir, tmp_path, capsys):
    def load(name, **kwargs):
        teller = FakeTeller(name, **kwargs)
        real = teller.caption

        def caption(images, **kw):
            if teller.batches:
                raise RuntimeError("out of memory")
            return real(images, **kw)

        teller.caption = caption
        return teller

    monkeypatch.setattr(StoryTeller, "from_pretrained", staticmethod(load))
    out = tmp_path / "captions.jsonl"
    out.write_text("kept\n")
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["caption", str(mixed_dir), "--batch-size", "2", "--out", str(out)])
    assert out.read_text() == "kept\n"  # the earlier file is untouched
    partial = Path(str(out) + ".tmp").read_text().splitlines()
    assert len(partial) == 2 and json.loads(partial[0])["caption"] == "a picture 40x30"
    assert "stopped after 2 captions" in capsys.readouterr().err


# --- the packaged model, end to end (slow: real weights, real captioning on a CPU) ------------------------------------
@pytest.mark.slow
@requires_packaged
def test_packaged_model_captions_a_directory(mixed_dir, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(mixed_dir), "--batch-size", "3", "--num-beams", "1", "--out", str(out),
                     "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(isinstance(r["caption"], str) and r["caption"].strip() for r in rows)
    assert "captioned 5 images, skipped 2 unreadable" in capsys.readouterr().err
