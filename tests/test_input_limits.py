"""Every number of a story request is checked in one place (`mmstory.limits`, through `Decoding.validate`) before any
work starts: finite and in its range, or a one-line error that names the range. The CLI exits 2 for every bad input
without loading a model; the demo refuses the same values before it decodes a picture; `mmstory answer` takes the
question after the images, as the README writes it. (The JSON API's cases are in test_serving.py's battery.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import make_photo

from mmstory import cli
from mmstory.generation import Decoding, StoryTeller
from mmstory.limits import DECODING_LIMITS
from mmstory.prompts import StoryInputError, word_budget


class ModelLoaded(AssertionError):
    """Raised by the patched loader: the command got as far as loading a model."""


@pytest.fixture
def no_model(monkeypatch):
    """StoryTeller.from_pretrained refuses to run: a command that returns with it never loaded the model."""
    calls = []

    def refuse(name, **kwargs):
        calls.append(name)
        raise ModelLoaded(f"the model {name!r} was loaded")

    monkeypatch.setattr(StoryTeller, "from_pretrained", staticmethod(refuse))
    return calls


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.jpg"
    make_photo(2).save(path)
    return path


BAD_DECODING = [
    # (setting, value, phrase of the allowed range)
    ("temperature", float("nan"), "between 0.05 and 2"),
    ("temperature", float("inf"), "between 0.05 and 2"),
    ("temperature", 1e308, "between 0.05 and 2"),
    ("temperature", 0, "between 0.05 and 2"),
    ("temperature", True, "between 0.05 and 2"),
    ("top_p", float("nan"), "between 0.05 and 1"),
    ("top_k", -1, "between 0 and 200"),
    ("top_k", 2.5, "whole number"),
    ("repetition_penalty", float("-inf"), "between 1 and 2"),
    ("num_beams", 64, "between 1 and 8"),
    ("num_candidates", 9, "between 1 and 8"),
    ("no_repeat_ngram_size", 100, "between 0 and 8"),
    ("seed", -1, "between 0 and 2**63 - 1"),
    ("max_new_tokens", 10**6, "between 1 and 2048"),
]


@pytest.mark.parametrize("name, value, allowed", BAD_DECODING, ids=[f"{n}={v}" for n, v, _ in BAD_DECODING])
def test_decoding_refuses_numbers_out_of_range_and_names_the_range(name, value, allowed):
    with pytest.raises(StoryInputError, match=re.escape(allowed)) as caught:
        Decoding(**{name: value}).validate()
    assert str(caught.value).startswith(name) and "\n" not in str(caught.value)


def test_every_limit_admits_the_default():
    Decoding().validate()
    for name, limit in DECODING_LIMITS.items():
        default = getattr(Decoding(), name)
        assert default is None or limit.low <= default <= limit.high, name


@pytest.mark.parametrize("flag, value, allowed", [
    ("--temperature", "nan", "between 0.05 and 2"),
    ("--temperature", "inf", "between 0.05 and 2"),
    ("--temperature", "1e308", "between 0.05 and 2"),
    ("--top-p", "-inf", "between 0.05 and 1"),
    ("--num-beams", "64", "between 1 and 8"),
    ("--repetition-penalty", "nan", "between 1 and 2"),
    ("--length", "-5", "between 20 and 1000"),
    ("--length", "100000", "between 20 and 1000"),
])
def test_cli_story_refuses_bad_numbers_with_exit_2_before_the_model_loads(no_model, photo, capsys, flag, value,
                                                                          allowed):
    assert cli.main(["story", str(photo), f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and allowed in err, err
    assert no_model == []


def test_cli_story_and_caption_without_an_image_exit_2(no_model, capsys):
    for command in (["story"], ["story", "--style", "mystery"], ["caption"], ["answer", "-q", "what is this?"]):
        assert cli.main(command) == 2, command
        assert "no image given" in capsys.readouterr().err
    assert no_model == []


@pytest.mark.parametrize("args, phrase", [
    (["--num-beams", "1000"], "between 1 and 32"),
    (["--batch-size", "0"], "between 1 and 256"),
])
def test_cli_caption_numbers_are_bounded(no_model, photo, capsys, args, phrase):
    assert cli.main(["caption", str(photo), *args]) == 2
    assert phrase in capsys.readouterr().err
    assert no_model == []


def test_a_negative_length_is_a_number_out_of_range_not_an_unknown_length():
    with pytest.raises(StoryInputError, match="between 20 and 1000, got -5"):
        word_budget("-5")
    with pytest.raises(StoryInputError, match="unknown length 'epic'.*between 20 and 1000"):
        word_budget("epic")


# --- mmstory answer IMAGE QUESTION ------------------------------------------------------------------------------------
@pytest.fixture
def tiny_loader(monkeypatch, tiny_teller):
    """from_pretrained gives the tiny random model (a real StoryTeller) whatever is asked for; records the asks."""
    asked = []

    def load(name, **kwargs):
        asked.append(name)
        return tiny_teller

    monkeypatch.setattr(StoryTeller, "from_pretrained", staticmethod(load))
    return asked


def test_answer_takes_the_question_after_the_images_as_the_readme_writes_it(tiny_loader, photo, capsys):
    assert cli.main(["answer", str(photo), "What is the dog doing?", "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["question"] == "What is the dog doing?" and len(result["captions"]) == 1
    assert cli.main(["answer", str(photo), "-q", "What is the dog doing?", "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == result["answer"]  # greedy: the same answer either way
    assert len(tiny_loader) == 2


def test_answer_without_a_question_says_so(no_model, photo, tmp_path, capsys):
    other = tmp_path / "other.png"
    make_photo(3).save(other)
    assert cli.main(["answer", str(photo), str(other)]) == 2  # the last image is not a question
    assert "looks like an image, not a question" in capsys.readouterr().err
    assert cli.main(["answer"]) == 2
    assert "give a question" in capsys.readouterr().err
    assert no_model == []


# --- the demo: the same checks, before any picture is decoded ---------------------------------------------------------
def _demo_story(teller):
    from mmstory.serve.demo import build_demo

    demo = build_demo(teller, delete_cache=None)
    (fn,) = [block_fn.fn for block_fn in demo.fns.values() if block_fn.api_name == "story"]
    return fn


@pytest.mark.parametrize("setting, value, allowed", [
    ("num_beams", 64, "num_beams must be a whole number between 1 and 8"),
    ("temperature", 1e308, "temperature must be a finite number between 0.05 and 2"),
    ("top_k", float("nan"), "top_k must be a whole number between 0 and 200"),
])
def test_demo_refuses_what_the_api_refuses_before_reading_the_pictures(tiny_teller, tmp_path, setting, value,
                                                                       allowed):
    import gradio as gr

    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")  # decoded first, this would be the error
    story = _demo_story(tiny_teller)
    settings = dict(pictures=[(str(not_a_picture), None)], prompt="", style="any", tone="any", audience="any",
                    length="20", temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1,
                    no_repeat_ngram_size=3, num_candidates=1, num_beams=1, seed=0, max_new_tokens=8, do_sample=True)
    with pytest.raises(gr.Error, match=allowed):
        list(story(**{**settings, setting: value}))
