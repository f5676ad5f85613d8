"""Questions about the pictures get answers, not stories: the text helpers, input checks before any model work, the
routing in the CLI and the JSON API (tiny random model), and one real answer from the packaged mmstory-small."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
import torch
from conftest import make_photo, requires_packaged

from mmstory.answering import (
    MAX_ANSWER_TOKENS,
    AnswerResult,
    AnswerStop,
    build_question_prompt,
    finish_answer,
    is_question,
)
from mmstory.generation import MAX_IMAGES, MAX_PROMPT_CHARS, StoryInputError
from mmstory.model import IMAGE_PLACEHOLDER


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- is_question ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "what is the dog doing?", "What is the dog doing", "  who is on the bike ", "Where was this taken",
    "how many people are there", "which animal is it", "is it raining", "Are they happy", "does the cat sleep",
    "do you see a car", "can you see the sea", "what's in the cup", "Don't they look tired", "the dog is doing what?",
    "A cat?", "why is the sky orange", "could this be a wedding", "Whose hat is that",
])
def test_questions_are_recognised(text):
    assert is_question(text)


@pytest.mark.parametrize("text", [
    "a dog on an adventure", "The cat who saved Christmas", "Will finds a treasure", "May day picnic",
    "Have the cat find a mouse", "island of lost toys", "whatever happens next", "Isabel at the beach",
    "howl at the moon", "", "   ", None, "!!",
])
def test_story_prompts_are_not_questions(text):
    assert not is_question(text)


# --- finish_answer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, answer", [
    ("The dog is running. It chases a ball. Then it sleeps.", "The dog is running. It chases a ball."),
    ("Answer: It is a cat.", "It is a cat."),
    ("  A: Two people.  ", "Two people."),
    ("It is a cat.\nHere is another question for you.", "It is a cat."),
    ("The photo does not show that.\n\nWould you like a story?", "The photo does not show that."),
    ("It is a cat. The cat is sitting on a", "It is a cat."),  # cut at the token limit: whole sentences only
    ("a cat sitting on a sofa,", "a cat sitting on a sofa."),  # no whole sentence: closed with a period
    ("Is it? Yes! It is \"red.\" More", "Is it? Yes!"),
    ("\n\n\n", ""),
    ("", ""),
])
def test_finish_answer_keeps_one_or_two_whole_sentences(raw, answer):
    assert finish_answer(raw) == answer


def test_finish_answer_max_sentences():
    assert finish_answer("One. Two. Three.", max_sentences=1) == "One."
    assert finish_answer("One. Two. Three.", max_sentences=3) == "One. Two. Three."


# --- build_question_prompt --------------------------------------------------------------------------------------------
def test_question_prompt_for_one_picture():
    prompt = build_question_prompt(["A dog runs on the beach."], "  what is the dog doing?", [["golden retriever"]])
    assert prompt.split("\n") == [
        IMAGE_PLACEHOLDER,
        "The photo shows: A dog runs on the beach. It shows: golden retriever.",
        "",
        "Question: What is the dog doing?",
        "Answer in one or two short sentences, only from what the photo shows. If the photo does not show it, say so.",
    ]


def test_question_prompt_for_an_album_without_images_or_hints():
    prompt = build_question_prompt(["A dog runs.", "", "A red car"], "is it night?", [[], [], ["sports car", ""]],
                                   with_images=False)
    assert IMAGE_PLACEHOLDER not in prompt
    lines = prompt.split("\n")
    assert lines[:3] == ["Photo 1 shows: A dog runs.", "Photo 2 shows: something the captioner could not describe.",
                         "Photo 3 shows: A red car. It shows: sports car."]
    assert lines[-2] == "Question: Is it night?"
    assert "only from what the photos show. If the photos do not show it, say so." in lines[-1]
    with_images = build_question_prompt(["a", "b", "c"], "why?")
    assert with_images.startswith(IMAGE_PLACEHOLDER * 3 + "\n") and "It shows" not in with_images


@pytest.mark.parametrize("captions, question, hints, problem", [
    ([], "what?", None, "at least one"),
    (["a dog"], "  ", None, "empty"),
    (["a dog", "a cat"], "what?", [["dog"]], "hints"),
])
def test_question_prompt_refuses_what_it_cannot_build(captions, question, hints, problem):
    with pytest.raises(ValueError, match=problem):
        build_question_prompt(captions, question, hints)


def test_answer_stop_ends_after_two_sentences_or_a_new_line():
    from mmstory.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    stop = AnswerStop(tokenizer)

    def ids(*texts):
        encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, encoded))
        return torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in encoded])

    done = stop(ids("It is a cat. It sleeps. ", "It is a cat. It sleeps", "It is 3.5 m", "A cat.\nMore", "\n\n\n"),
                None)
    assert done.tolist() == [True, False, False, True, False]


# --- StoryTeller.answer on the tiny model: bad input fails before any model work --------------------------------------
def count_encoder_calls(teller):
    """Make the teller's image encoder (the first model work of an answer) count its calls in `encoder_calls`."""
    calls = []
    encode = teller.model.encode_image

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    teller.model.encode_image = counting
    teller.encoder_calls = calls
    return teller


@pytest.fixture
def guarded_teller(tiny_teller):
    """The tiny teller, whose image encoder counts its calls: a refused question must leave it at zero."""
    return count_encoder_calls(tiny_teller)


@pytest.mark.parametrize("images, question, kwargs, problem", [
    ("photo", "", {}, "the question is empty"),
    ("photo", "   \n", {}, "the question is empty"),
    ("photo", None, {}, "the question is empty"),
    ("photo", 42, {}, "question must be text"),
    ("photo", "x" * (MAX_PROMPT_CHARS + 1), {}, "question is too long"),
    ("photo", "is there gore in it?", {}, "content filter"),
    ("photo", "what is it?", {"max_new_tokens": 0}, "max_new_tokens"),
    ("photo", "what is it?", {"max_new_tokens": MAX_ANSWER_TOKENS + 1}, "max_new_tokens"),
    ("photo", "what is it?", {"seed": -1}, "seed"),
    (None, "what is it?", {}, "no image given"),
    ([], "what is it?", {}, "no image given"),
    ("many", "what is it?", {}, "too many images"),
    (b"not an image", "what is it?", {}, "not a readable image"),
])
def test_bad_input_is_refused_before_the_model_runs(guarded_teller, images, question, kwargs, problem):
    images = {"photo": make_photo(1), "many": [make_photo(1)] * (MAX_IMAGES + 1)}.get(images, images) \
        if isinstance(images, str) else images
    with pytest.raises(StoryInputError, match=problem):
        guarded_teller.answer(images, question, **kwargs)
    assert guarded_teller.encoder_calls == []


def test_answer_result_from_the_tiny_model(guarded_teller):
    """The whole path runs (captions, prompt, greedy decoding), deterministically, and serialises."""
    images = [make_photo(2), make_photo(3)]
    first = guarded_teller.answer(images, "  what is in the pictures?  ", max_new_tokens=16)
    again = guarded_teller.answer(images, "what is in the pictures?", max_new_tokens=16, seed=9)  # greedy
    assert guarded_teller.encoder_calls == [1, 1]
    assert isinstance(first, AnswerResult) and first.question == "what is in the pictures?"
    assert first.answer == again.answer and first.captions == again.captions and len(first.captions) == 2
    assert {"caption_s", "generate_s", "total_s"} <= set(first.timings)
    data = json.loads(json.dumps(first.to_dict()))
    assert data["kind"] == "answer" and data["answer"] == first.answer and data["captions"] == first.captions


# --- the JSON API (in-process app around the tiny teller) -------------------------------------------------------------
@pytest.fixture(scope="module")
def api_client():
    """The app `mmstory serve` runs (JSON API and Gradio page), in process around a tiny teller: built once."""
    from fastapi.testclient import TestClient

    from mmstory import create_model
    from mmstory.generation import StoryTeller
    from mmstory.serve.app import build_app

    torch.manual_seed(0)
    teller = count_encoder_calls(StoryTeller(create_model("tiny"), dtype="float32", compile=False))
    with TestClient(build_app(teller, model_name="tiny", queue_size=2, max_upload_mb=1)) as client:
        client.teller = teller
        yield client


@pytest.fixture
def api(api_client):
    api_client.teller.encoder_calls.clear()
    return api_client


PHOTO = png(make_photo(5))
B64 = base64.b64encode(PHOTO).decode()

BAD_ANSWER_REQUESTS = {
    # name: (request keywords, status, phrase in the error)
    "no-question-json": (dict(json={"images": [B64]}), 400, "question"),
    "no-question-form": (dict(files=[("image", ("a.png", PHOTO, "image/png"))]), 400, "question"),
    "empty-question": (dict(json={"images": [B64], "question": "  "}), 400, "the question is empty"),
    "question-not-text": (dict(json={"images": [B64], "question": 7}), 400, "question"),
    "long-question": (dict(json={"images": [B64], "question": "why " * MAX_PROMPT_CHARS}), 400,
                      "question is too long"),
    "long-question-form": (dict(files=[("image", ("a.png", PHOTO, "image/png"))], data={"question": "x" * 5000}),
                           400, "question is too long"),
    "blocked-question": (dict(json={"images": [B64], "question": "is this porn?"}), 400, "content filter"),
    "no-image": (dict(json={"question": "what is it?"}), 400, "no image given"),
    "wrong-file-field": (dict(data={"question": "what is it?"}, files=[("other", ("a.txt", b"x", "text/plain"))]),
                         400, "unexpected file field"),
    "not-an-image": (dict(files=[("image", ("a.png", b"hello", "image/png"))], data={"question": "what?"}), 400,
                     "not a readable image"),
    "bad-base64": (dict(json={"images": ["%%%"], "question": "what?"}), 400, "base64"),
    "story-setting": (dict(json={"images": [B64], "question": "what?", "style": "mystery"}), 400, "style"),
    "too-many-tokens": (dict(json={"images": [B64], "question": "what?", "max_new_tokens": 999}), 400,
                        "max_new_tokens"),
    "not-json": (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "wrong-content-type": (dict(content=b"what?", headers={"content-type": "text/plain"}), 415, "multipart"),
    "body-over-limit": (dict(content=b"x" * (2**20 + 1), headers={"content-type": "application/json"}), 413,
                        "too large"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWER_REQUESTS))
def test_api_answer_bad_input_is_a_clear_4xx(api, case):
    request, status, phrase = BAD_ANSWER_REQUESTS[case]
    response = api.post("/api/answer", **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert phrase in body["detail"] and body["code"]
    assert api.teller.encoder_calls == []
    assert api.get("/health").json()["busy"] == 0


def test_api_answer_multipart_and_json(api):
    form = api.post("/api/answer", files=[("image", ("x.png", PHOTO, "image/png"))],
                    data={"question": "what is the dog doing?", "max_new_tokens": "8", "seed": "3"})
    assert form.status_code == 200, form.text
    body = form.json()
    assert body["kind"] == "answer" and body["question"] == "what is the dog doing?" and len(body["captions"]) == 1
    assert isinstance(body["answer"], str) and {"caption_s", "generate_s", "total_s"} <= set(body["timings"])
    album = api.post("/api/answer", json={"images": [B64, "data:image/png;base64," + B64], "question": "Is it day?",
                                          "max_new_tokens": 8})
    assert album.status_code == 200, album.text
    assert album.json()["kind"] == "answer" and len(album.json()["captions"]) == 2


def test_api_story_answers_a_question_prompt_and_still_writes_stories(api):
    asked = api.post("/api/story", json={"images": [B64], "prompt": "what is the dog doing?", "max_new_tokens": 8})
    assert asked.status_code == 200, asked.text
    assert asked.json()["kind"] == "answer" and "story" not in asked.json()
    told = api.post("/api/story", json={"images": [B64], "prompt": "a dog at the sea", "length": 20,
                                        "max_new_tokens": 8, "num_candidates": 1})
    assert told.status_code == 200, told.text
    assert told.json()["kind"] == "story" and "story" in told.json() and "answer" not in told.json()
    empty = api.post("/api/story", json={"images": [], "prompt": "what is it?"})
    assert empty.status_code == 400 and "no image given" in empty.json()["detail"]


def test_openapi_describes_the_answer_endpoint(api):
    body = api.get("/openapi.json").json()["paths"]["/api/answer"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert set(schema["required"]) == {"images", "question"}
    assert {"question", "max_new_tokens", "seed"} <= set(schema["properties"])
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"


# --- the Gradio demo --------------------------------------------------------------------------------------------------
def test_demo_shows_the_answer_to_a_question_in_the_story_box(guarded_teller, tmp_path):
    import gradio as gr

    from mmstory.serve.app import build_demo

    demo = build_demo(guarded_teller)
    write = next(f.fn for f in demo.fns.values() if f.api_name == "story")
    photo = tmp_path / "photo.png"
    make_photo(3).save(photo)
    settings = ("any", "any", "any", "medium", 0.8, 50, 0.92, 1.15, 4, 1, 1, 0, 8, True)
    *_, (shown, grounding, captions, status, details) = write([(str(photo), None)], "what is this?", *settings)
    assert details["kind"] == "answer" and shown == details["answer"] and grounding == []
    assert captions == [[1, details["captions"][0]]] and status.startswith("Answered in")
    *_, last = write([(str(photo), None)], "a day at the sea", *settings)  # not a question: a story, as before
    assert "story" in last[4] and "kind" not in last[4]
    guarded_teller.encoder_calls.clear()
    statuses = []
    with pytest.raises(gr.Error, match="no image given"):
        for event in write([], "what is this?", *settings):
            statuses.append(event[3])
    assert statuses[-1].startswith("**Cannot answer this question:** no image given")
    assert guarded_teller.encoder_calls == []


# --- the CLI ----------------------------------------------------------------------------------------------------------
def test_cli_refuses_a_bad_question_before_loading_the_model(tmp_path, capsys):
    from mmstory import cli

    missing = str(tmp_path / "no-such-model")  # loading it would raise FileNotFoundError
    photo = tmp_path / "photo.png"
    make_photo(1).save(photo)
    assert cli.main(["answer", str(photo), "-q", "  ", "--model", missing]) == 2
    assert "the question is empty" in capsys.readouterr().err
    assert cli.main(["answer", str(photo), "-q", "x" * (MAX_PROMPT_CHARS + 1), "--model", missing]) == 2
    assert "question is too long" in capsys.readouterr().err
    assert cli.main(["answer", str(photo), "-q", "what?", "--max-new-tokens", "0", "--model", missing]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert cli.main(["answer", str(tmp_path / "nothing.png"), "-q", "what?", "--model", missing]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["story", "--prompt", "what is this?", "--model", missing]) == 2
    assert "image" in capsys.readouterr().err
    assert cli.main(["answer", str(photo), "--model", missing]) == 2  # no question after the image
    assert "not a question" in capsys.readouterr().err


@pytest.fixture
def tiny_dir(tmp_path):
    """The tiny model saved where the CLI can load it; eager decoding (no torch.compile) to keep the test short.

    `config.patch`, not monkeypatch: monkeypatch's undo deletes the option from dynamo's config, which breaks every
    later torch.compile in the session."""
    from mmstory import create_model

    torch.manual_seed(0)
    create_model("tiny").save_pretrained(tmp_path / "tiny")
    with torch._dynamo.config.patch(disable=True):
        yield tmp_path / "tiny"


def test_cli_answer_and_story_with_a_question(tiny_dir, tmp_path, capsys):
    from mmstory import cli

    photo = tmp_path / "photo.png"
    make_photo(2).save(photo)
    common = ["--model", str(tiny_dir), "--dtype", "float32", "--quantize", "none", "--max-new-tokens", "8", "--json"]
    assert cli.main(["answer", str(photo), "--question", "what is this?", *common]) == 0
    answered = json.loads(capsys.readouterr().out)
    assert answered["kind"] == "answer" and answered["question"] == "what is this?" and len(answered["captions"]) == 1
    assert cli.main(["story", str(photo), "--prompt", "what is this?", *common]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert routed == {**answered, "timings": routed["timings"]}  # the same answer, by the same greedy decoding
    assert cli.main(["story", str(photo), "--prompt", "a day at the sea", "--length", "20", "--num-candidates", "1",
                     *common]) == 0
    story = json.loads(capsys.readouterr().out)
    assert "story" in story and "answer" not in story


def test_cli_help_explains_questions(capsys):
    from mmstory import cli

    with pytest.raises(SystemExit):
        cli.main(["answer", "--help"])
    assert "--question" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["story", "--help"])
    assert "question about the pictures" in re.sub(r"\s+", " ", capsys.readouterr().out)


# --- the packaged model, end to end (slow: real weights, real decoding on a CPU) --------------------------------------
@pytest.mark.slow
@requires_packaged
def test_packaged_model_answers_what_animal_the_cat_is():
    from mmstory.examples import example_image
    from mmstory.factory import packaged_models
    from mmstory.generation import StoryTeller

    if "mmstory-small" not in packaged_models():
        pytest.skip("mmstory-small weights are not shipped in this checkout")
    teller = StoryTeller.from_pretrained("mmstory-small")
    result = teller.answer(example_image("chelsea"), "what animal is this?")
    assert re.search(r"\b(cat|cats|kitten|kitty)\b", result.answer.lower()), result
    assert len(re.findall(r"[.!?](\s|$)", result.answer)) <= 2 and re.search(r"[.!?]$", result.answer), result
    assert "Once upon a time" not in result.answer and len(result.answer.split()) <= 40, result
