"""Story beats (mmstory.story_beats): the plan a caption gives, and the forced words as every decoder applies them."""

from __future__ import annotations

import pytest
import torch
from conftest import make_photo
from transformers import LogitsProcessorList

from mmstory.decoding import FastDecoder
from mmstory.serve.batcher import Batcher
from mmstory.story_beats import (
    ENDING,
    TURN,
    WANT,
    Beat,
    BeatProcessor,
    PoemLines,
    plan_beats,
    subject_words,
)
from mmstory.story_text import finish_story
from mmstory.tiny import tiny_decoder


def test_the_plan_names_the_captions_subject_and_keeps_the_order():
    assert subject_words("A black and white dog is running on the grass.") == ["a", "black", "and", "white", "dog"]
    assert subject_words("Two dogs play in the snow.") == ["two", "dogs"]
    # the caption decoder's "a <thing> of a <creature>" names a thing: "the plate of a dog wanted to eat" reads badly
    assert subject_words("A plate of a black and white dog is sitting on the lap.") == ["a", "plate"]
    assert subject_words("A group of people are standing in the snow.") == ["a", "group", "of", "people"]
    assert subject_words("A tennis player in a blue shirt.") == ["a", "tennis", "player"]  # not "the tennis"
    want, turn, ending = plan_beats("A black dog is swimming.", seed=3)
    assert want.words in [w.format(who="the black dog") for w in WANT]
    assert turn.words in TURN["default"] and ending.words in ENDING["default"]
    assert want.at < turn.at < ending.at


@pytest.mark.parametrize("caption, subject", [
    ("A cheetah is jumping in a tree.", ["a", "cheetah"]),  # an ImageNet animal Flickr8k's words do not know
    ("An animal is sitting.", ["an", "animal"]),
    ("An oystercatcher in the water.", ["an", "oystercatcher"]),
    ("A train on the street.", ["a", "train"]),
    ("Two airplanes in the air.", ["two", "airplanes"]),
    ("A microwave in the kitchen.", ["a", "microwave"]),
    ("Some food in a restaurant.", None),  # food is what someone wants, not who wants
    ("A pizza in a kitchen.", None),
    ("A cauliflower.", None),
    ("A room.", None),  # a place is where the story happens
    ("The grass.", None),
])
def test_an_animal_or_a_thing_may_want_but_not_food_or_a_place(caption, subject):
    assert subject_words(caption) == subject
    beats = plan_beats(caption, seed=1)
    if subject is None:
        assert len(beats) == 2 and not any("wanted" in b.words for b in beats)
    else:
        assert "wanted" in beats[0].words


def test_a_things_want_is_forced_to_a_verb():
    """ "One day, the food wanted by everyone was ..." is no want: a thing's beat ends "wanted to"."""
    assert plan_beats("A train on the street.", seed=0)[0].words.endswith(" the train wanted to")
    assert plan_beats("A black dog is swimming.", seed=0)[0].words.endswith(" the black dog wanted")


def test_styles_shape_the_plan():
    fairy = plan_beats("A young boy wearing a red shirt is running.", style="Fairy tale")
    assert fairy[0] == Beat("Once upon a time, there lived a young boy", 0.0)
    assert plan_beats("A dog runs.", style="poem") == []
    assert plan_beats("A dog runs.", style="bedtime")[-1].words in ENDING["bedtime"]
    assert plan_beats("A dog runs.", tone="negative")[-1].words in ENDING["negative"]
    assert {plan_beats("A dog runs.", seed=s)[0].words for s in range(12)} == {
        w.format(who="the dog") for w in WANT}  # candidates differ in phrasing


def forced_run(processor: BeatProcessor, tokenizer, text: str, steps: int) -> str:
    """Decode `steps` tokens after `text` with flat scores: what comes out is only what the processor forces
    (token 0 when nothing is)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for _ in range(steps):
        scores = processor(torch.tensor([ids]), torch.zeros(1, len(tokenizer)))
        ids.append(int(scores[0].argmax()))
    return tokenizer.decode(ids[-steps:])


def test_a_beat_starts_at_a_sentence_end_past_its_share_of_the_budget():
    _, tokenizer = tiny_decoder()
    zero = tokenizer.convert_ids_to_tokens(0)
    early = BeatProcessor(tokenizer, [[Beat("But", 0.5)]], budget=20)
    assert forced_run(early, tokenizer, "A dog runs.", 4).count(zero) == 4  # 3 words < 10: nothing forced
    late = BeatProcessor(tokenizer, [[Beat("But", 0.1)]], budget=20)
    assert forced_run(late, tokenizer, "A dog runs", 2).count(zero) == 2  # no sentence end yet
    assert forced_run(late, tokenizer, 'A dog says: "I run.', 2).count(zero) == 2  # not inside a quotation
    assert forced_run(late, tokenizer, 'A dog says: "I run."', 2) == " B"
    out = forced_run(late, tokenizer, "A dog runs.", 6)
    assert out.startswith(" But") and out[4:].count(zero) == 2  # forced once, then free


def test_a_poem_breaks_its_lines_at_commas_and_sentence_ends():
    _, tokenizer = tiny_decoder()
    lines = PoemLines(tokenizer)
    assert forced_run(lines, tokenizer, "The sea is blue,", 1) == "\n"
    assert forced_run(lines, tokenizer, "The sea,", 1) != "\n"  # two words: no line yet
    assert forced_run(lines, tokenizer, "The sea is very blue", 1) != "\n"  # no clause end
    poem = "The sea is blue,\n the sky is wide.\nA small dog runs along the shore,\nand barks at every wave."
    assert finish_story(poem, 20, keep_lines=True).splitlines() == [
        "The sea is blue,", "the sky is wide.", "A small dog runs along the shore,", "and barks at every wave."]
    assert "wide. A small" in finish_story(poem, 20)  # prose: a sentence end joins the next sentence
    assert finish_story(poem, 12, keep_lines=True).splitlines() == ["The sea is blue,", "the sky is wide."]


def test_forced_words_are_the_same_in_every_decoder():
    """transformers.generate, FastDecoder and the server's shared loop give the same tokens, the beat's first."""
    model, tokenizer = tiny_decoder()
    model.generation_config.eos_token_id = None
    model.eval()
    ids = tokenizer("Tell a story.", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).expand(2, -1, -1)
    plans = [[Beat("But the cat", 0.0)], [Beat("Then a bird", 0.0)]]

    def settings():
        return dict(max_new_tokens=16, do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList(
            [BeatProcessor(tokenizer, plans, budget=30, opening="A dog runs.")]))

    with torch.no_grad():
        expected = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                  **settings())
    fast = FastDecoder(model, compile=False)
    assert torch.equal(fast.generate(embeds, **settings()), expected)
    batcher = Batcher(fast)
    try:
        assert torch.equal(batcher.decoder(fast.generate)(inputs_embeds=embeds, **settings()), expected)
    finally:
        batcher.close()
    texts = tokenizer.batch_decode(expected)
    assert texts[0].startswith(" But the cat") and texts[1].startswith(" Then a bird")


@pytest.mark.parametrize("style, first", [("fairy tale", "Once upon a time,"), ("poem", None)])
def test_the_teller_opens_a_fairy_tale_like_one(tiny_teller, style, first):
    tiny_teller.model.generation_config.story_beats = True
    result = tiny_teller.generate_story(make_photo(2), style=style, length=20, max_new_tokens=40, seed=1,
                                        num_candidates=2)
    for candidate in result.candidates:
        assert candidate.startswith(first) if first else not candidate.startswith("Once upon a time")

