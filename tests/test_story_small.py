"""End-to-end stories with the real packaged mmstory-small (slow: real weights, real decoding on a CPU)."""

import re

import pytest
import torch

from mmstory.eval.metrics import shared_content_words
from mmstory.examples import example_image
from tests.conftest import requires_packaged

pytestmark = [pytest.mark.slow, requires_packaged]


@pytest.fixture(scope="module")
def teller():
    from mmstory.factory import packaged_models
    from mmstory.generation import StoryTeller

    if "mmstory-small" not in packaged_models():
        pytest.skip("mmstory-small weights are not shipped in this checkout")
    return StoryTeller.from_pretrained("mmstory-small")


def _words(text: str) -> int:
    return len(text.split())


def test_captions_follow_the_image(teller):
    names = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle"]
    captions = teller.caption([example_image(n) for n in names])
    assert len(captions) == len(names) and len(set(captions)) == len(names), captions
    assert all(len(c.split()) >= 2 for c in captions), captions


def test_a_caption_the_classifier_contradicts_is_told_about_what_it_sees(teller):
    # the caption decoder alone calls scikit-image's cup of coffee "A brown dog is sitting on the floor."
    choice = teller.caption_choices([example_image("coffee")])[0]
    assert "coffee" in choice.caption.lower() and "dog" not in choice.caption.lower(), choice
    assert any(step.startswith("check") for step in choice.trace) and choice.confidence > 0.5, choice
    config = teller.model.generation_config
    saved = (config.caption_class_check, config.caption_concepts, config.caption_hedge)
    config.caption_class_check = config.caption_concepts = config.caption_hedge = 0.0
    try:
        unchecked = teller.caption([example_image("coffee")])[0]
    finally:
        config.caption_class_check, config.caption_concepts, config.caption_hedge = saved
    assert "coffee" not in unchecked.lower(), unchecked


def test_the_decoder_writes_an_imagenet_word_no_training_caption_has(teller):
    """Gradio's cheetah: "cheetah" is not in the caption decoder's fitted vocabulary (no Flickr8k caption taught it);
    with the open vocabulary, constrained beam search alone (no subject check) writes it, as one added word."""
    from pathlib import Path

    gradio = pytest.importorskip("gradio")
    photo = Path(gradio.__file__).parent / "media_assets" / "images" / "cheetah1.jpg"
    if not photo.is_file():
        pytest.skip("this gradio ships no cheetah photo")
    model = teller.model
    assert model.generation_config.caption_open_vocabulary
    tokens = model.tokenizer(" cheetah", add_special_tokens=False).input_ids
    assert len(tokens) != 1 or int(model.caption_decoder.compact_table()[tokens[0]]) == model.caption_decoder.UNK
    config = model.generation_config
    saved = config.caption_class_check
    config.caption_class_check = 0.0
    try:
        choice = teller.caption_choices([photo])[0]
        config.caption_open_vocabulary = False
        closed = teller.caption([photo])[0]  # what the decoder could say before: no word for it
    finally:
        config.caption_class_check, config.caption_open_vocabulary = saved, True
    assert "cheetah" in choice.caption.lower(), choice
    assert any("must be written" in step for step in choice.trace), choice
    assert "cheetah" not in closed.lower(), closed


def test_caption_mentions_the_cat(teller):
    caption = teller.caption([example_image("chelsea")])[0]
    assert re.search(r"\b(cat|cats|kitten|kitty)\b", caption.lower()), caption


@pytest.mark.parametrize("length, budget", [("short", 80), (50, 50)])
@pytest.mark.parametrize("name", ["chelsea", "astronaut"])
def test_length_setting_is_met_with_whole_sentences(teller, name, length, budget):
    result = teller.generate_story(example_image(name), length=length, num_candidates=2, seed=1)
    words = _words(result.story)
    assert 0.7 * budget <= words <= 1.2 * budget, (words, result.story)
    assert re.search(r"[.!?][\"'”’)]*$", result.story), result.story


def test_album_story_mentions_each_picture(teller):
    images = [example_image("chelsea"), example_image("rocket")]
    result = teller.generate_story(images, style="adventure", length=120, num_candidates=3, seed=0)
    story = result.story.lower()
    for caption in result.captions:
        content = shared_content_words([caption], min_captions=1)
        assert any(re.search(rf"\b{re.escape(w)}", story) for w in content), (caption, result.story)


def test_stream_yields_several_chunks_that_join_to_the_story(teller):
    events = list(teller.stream_result(example_image("coffee"), length="short", seed=2))
    *chunks, result = events
    assert len(chunks) > 1
    assert "".join(chunks) == result.story
    assert result.timings["first_token_s"] < result.timings["total_s"]


def test_same_seed_same_story(teller):
    a = teller.generate_story(example_image("coffee"), length=40, num_candidates=2, seed=5).story
    b = teller.generate_story(example_image("coffee"), length=40, num_candidates=2, seed=5).story
    assert a == b


def test_a_picture_without_people_keeps_person_words_and_the_narrator_out_of_the_story(teller):
    from mmstory.avoided_words import avoided_words

    coffee = teller.caption_choices([example_image("coffee")])[0]
    assert not coffee.people, coffee  # an espresso: no person in the caption or the classes
    tokenizer, config = teller.model.tokenizer, teller.model.generation_config
    avoided = set(avoided_words(tokenizer, config, [coffee], None, None).tokens)
    for word in (" man", " woman", " family", " I", " my", " we"):
        assert tokenizer(word, add_special_tokens=False).input_ids[0] in avoided, word
    for word in (" coffee", " cup", " season", " Ice"):  # the picture's words, and words that only start alike
        assert not set(tokenizer(word, add_special_tokens=False).input_ids) & avoided, word
    asked = set(avoided_words(tokenizer, config, [coffee], "A story about my grandfather's coffee.", None).tokens)
    assert tokenizer(" man", add_special_tokens=False).input_ids[0] not in asked  # the request brings a person
    assert tokenizer(" my", add_special_tokens=False).input_ids[0] not in asked  # and speaks as "I"
    story = teller.generate_story(example_image("coffee"), seed=0, length=40, num_candidates=2).story
    assert not re.search(r"(?<= )(I|my|we|our|man|woman)\b", story, re.IGNORECASE), story  # no word-initial form
    banned = avoided_words(tokenizer, config, [coffee], None, None)
    police, man = tokenizer(" policeman", add_special_tokens=False).input_ids  # two tokens: no single one to suppress
    assert [police, man] in banned.sequences
    assert police not in banned.tokens and man not in banned.tokens  # " police station", "woman" stay writable
    processor = banned.processor(tokenizer.eos_token_id)
    scores = processor(torch.tensor([[police], [man]]), torch.zeros(2, len(tokenizer)))
    assert scores[0, man] == float("-inf") and scores[1, man] == 0  # "man" is refused only after " police"
    grim = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" blood", " killed", " dead")]
    assert set(grim) <= avoided  # no blood in a story about a cup of coffee ...
    assert not set(grim) & set(avoided_words(tokenizer, config, [coffee], None, None, dark=True).tokens)  # unless asked
    devoured = tokenizer(" devoured", add_special_tokens=False).input_ids  # two tokens, banned as a sequence
    assert len(devoured) == 2 and devoured in banned.sequences
    assert devoured not in avoided_words(tokenizer, config, [coffee], None, None, dark=True).sequences


def test_a_story_of_a_boy_may_not_bring_in_a_mother_unless_asked(teller):
    from mmstory.avoided_words import avoided_words
    from mmstory.caption_policy import CaptionChoice

    boy = CaptionChoice("A young boy in a red shirt is jumping on the street.", 0.5, True, 0.1, [], [], people=True)
    tokenizer, config = teller.model.tokenizer, teller.model.generation_config
    assert config.story_cast_from_pictures  # shipped on
    banned = avoided_words(tokenizer, config, [boy], None, None)
    ids = {word: tokenizer(word, add_special_tokens=False).input_ids for word in (" she", " She", " mother", " he")}
    assert ids[" she"][0] in banned.tokens and ids[" She"][0] in banned.tokens and ids[" he"][0] not in banned.tokens
    assert ids[" mother"][0] in banned.tokens or ids[" mother"] in banned.sequences
    asked = avoided_words(tokenizer, config, [boy], "A story about the boy and his mother.", None)
    assert ids[" she"][0] not in asked.tokens  # the request brings her in
