"""StoryTeller plumbing on the tiny random model: inputs, controls, reranking, filtering, streaming."""

import io
import re

import pytest
import torch

from mmstory.avoided_words import first_person, other_sex_words, people_shown
from mmstory.caption_policy import CaptionChoice
from mmstory.config import GenerationConfig
from mmstory.decoding import decode_layer
from mmstory.generation import (
    StoryInputError,
    StoryTeller,
    WordBudget,
    build_instruction,
    split_sentences,
    word_budget,
)
from mmstory.safety import ContentFilter
from mmstory.story_beats import reaches_ending
from mmstory.story_picking import WriterLikelihood, caption_coverage, pick_candidate
from mmstory.story_text import finish_story, settled_text
from mmstory.text import FEMALE_WORDS, MALE_WORDS, names_person, sexes_named
from tests.conftest import make_photo

FAST = dict(length=20, max_new_tokens=24, num_candidates=2)


def test_same_seed_same_story_and_different_seed_differs(tiny_teller):
    image = make_photo(1)
    a = tiny_teller.generate_story(image, seed=7, **FAST)
    b = tiny_teller.generate_story(image, seed=7, **FAST)
    c = tiny_teller.generate_story(image, seed=8, **FAST)
    assert a.story == b.story and a.candidates == b.candidates
    assert a.candidates != c.candidates


def test_reranking_picks_the_best_scoring_candidate(tiny_teller):
    images = [make_photo(2), make_photo(3)]
    result = tiny_teller.generate_story(images, seed=1, length=20, max_new_tokens=24, num_candidates=4)
    _, pooled = tiny_teller._encode(tiny_teller._load_images(images))
    image_embeds = tiny_teller.model.image_embedding(pooled)
    scores = [tiny_teller._agreement(c, image_embeds) for c in result.candidates]
    assert len(result.candidates) == 4
    hints = tiny_teller.model.sure_classes(pooled, tiny_teller.model.generation_config.caption_concepts)
    best = pick_candidate(result.candidates, result.captions, hints, scores, [False] * 4, 20)
    assert result.story == result.candidates[best]
    assert result.score == pytest.approx(scores[best])


def test_caption_coverage_counts_the_pictures_a_story_mentions():
    captions = ["A dog runs on the grass.", "A red car parked at night."]
    assert caption_coverage("The dog chased a ball all day.", captions) == 0.5
    assert caption_coverage("The dog slept in the car.", captions) == 1.0
    assert caption_coverage("Nothing happened.", captions) == 0.0
    assert caption_coverage("Anything.", []) == 0.0


def test_result_carries_captions_settings_timings_and_serialises(tiny_teller):
    result = tiny_teller.generate_story([make_photo(4), make_photo(5)], style="mystery", tone="negative", **FAST)
    assert len(result.captions) == 2
    data = result.to_dict()
    assert data["settings"]["style"] == "mystery" and data["settings"]["word_budget"] == 20
    assert {"caption_s", "generate_s", "total_s"} <= set(data["timings"])
    import json

    json.dumps(data)


def test_streaming_chunks_join_to_the_story(tiny_teller):
    events = list(tiny_teller.stream_result(make_photo(6), seed=3, length=20, max_new_tokens=24))
    *chunks, result = events
    assert all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == result.story


def test_compiled_decoder_streams_the_story_it_generates(tiny_model):
    teller = StoryTeller(tiny_model, dtype="float32")  # compiled decode step, as users run it
    streamed = "".join(teller.stream_story(make_photo(4), seed=4, length=20, max_new_tokens=24))
    result = teller.generate_story(make_photo(4), seed=4, num_candidates=1, length=20, max_new_tokens=24)
    assert streamed == result.story and result.story
    assert teller.fast._layer_fn is not decode_layer, "the compiled step fell back to eager decoding"


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=None), "no image given"),
    (dict(images=[]), "no image given"),
    (dict(images=b""), "empty"),
    (dict(images=b"this is not an image"), "not a readable image"),
    (dict(images="/no/such/file.jpg"), "no such file"),
    (dict(images=12345), "expected an image"),
    (dict(prompt="x" * 5000), "too long"),
    (dict(prompt=42), "must be text"),
    (dict(style="interpretive dance"), "unknown style"),
    (dict(style="custom: "), "custom style"),
    (dict(tone="furious"), "unknown tone"),
    (dict(length="epic"), "unknown length"),
    (dict(length=5), "between 20"),
    (dict(temperature=0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_candidates=3, num_beams=2, do_sample=False), "cannot exceed num_beams"),
    (dict(num_candidates=0), "num_candidates"),
    (dict(warp_speed=9), "unknown decoding setting"),
])
def test_bad_input_gets_a_clear_error(tiny_teller, kwargs, message):
    kwargs = {"images": make_photo(0), **kwargs}
    with pytest.raises(StoryInputError, match=message):
        tiny_teller.generate_story(**kwargs)


def test_truncated_and_oversized_images_are_refused(tiny_teller):
    buffer = io.BytesIO()
    make_photo(0, size=(200, 150)).save(buffer, format="JPEG")
    with pytest.raises(StoryInputError, match="truncated|not a readable"):
        tiny_teller.generate_story(buffer.getvalue()[:300], **FAST)
    from PIL import Image

    big = io.BytesIO()
    Image.new("1", (20000, 20000)).save(big, format="PNG")  # small file, 400 megapixels
    with pytest.raises(StoryInputError, match="too large"):
        tiny_teller.generate_story(big.getvalue(), **FAST)
    with pytest.raises(StoryInputError, match="too many images"):
        tiny_teller.generate_story([make_photo(0)] * 9, **FAST)


def test_content_filter_blocks_prompts_and_redacts_outputs(tiny_model):
    teller = StoryTeller(tiny_model, dtype="float32", content_filter=ContentFilter(extra=["dragonfruit"]))
    with pytest.raises(StoryInputError, match="content filter blocked.*dragonfruit"):
        teller.generate_story(make_photo(0), prompt="a story about a Dragonfruit", **FAST)
    flt = ContentFilter(blocklist=["wolf"])
    assert flt.check("The wolf ran.").blocked and not flt.check("The wolfram lamp.").blocked
    assert flt.redact("The sun rose. The wolf ran. Birds sang.") == "The sun rose. Birds sang."
    assert not ContentFilter(enabled=False).check("torture").blocked


def test_output_filter_acts_on_the_generated_story(tiny_model):
    # the tiny model writes random bytes; block every word it wrote and check the result says so
    teller = StoryTeller(tiny_model, dtype="float32")
    candidates = teller.generate_story(make_photo(0), seed=5, **FAST).candidates
    words = set(re.findall(r"\w+", " ".join(candidates)))
    assert words, candidates
    strict = StoryTeller(tiny_model, dtype="float32", content_filter=ContentFilter(blocklist=sorted(words)))
    result = strict.generate_story(make_photo(0), seed=5, **FAST)
    assert result.filtered and "content filter" in result.notice


def test_a_note_to_the_user_after_the_story_is_dropped():
    story = "The cat sat on the wall. It watched the birds all day."
    note = "What would you like me to write? You can just paste the text here below!"
    assert finish_story(f"{story}\n{note}", 200) == story
    assert finish_story(f"{story}\n\nI hope you enjoyed this story.", 200) == story
    two = f"{story}\nAt dusk it went home to sleep."  # a story of two paragraphs keeps both
    assert finish_story(two, 200) == two.replace("\n", " ")


def test_a_candidate_the_content_filter_passes_is_preferred(tiny_model):
    teller = StoryTeller(tiny_model, dtype="float32")
    result = teller.generate_story(make_photo(0), seed=1, length=20, max_new_tokens=24, num_candidates=4)
    words = sorted(set(re.findall(r"\w+", result.story)) - set(re.findall(r"\w+", " ".join(
        c for c in result.candidates if c != result.story))))
    assert words, result.candidates  # a word only the chosen candidate has
    strict = StoryTeller(tiny_model, dtype="float32", content_filter=ContentFilter(blocklist=words))
    again = strict.generate_story(make_photo(0), seed=1, length=20, max_new_tokens=24, num_candidates=4)
    assert again.candidates == result.candidates
    assert again.story != result.story and not again.filtered  # another, clean candidate won


def test_length_helpers():
    assert word_budget("short") == 80 and word_budget(120) == 120 and word_budget("150") == 150
    text = "One two three. Four five six seven! Eight nine ten eleven twelve? Thirteen fourteen"
    assert split_sentences(text)[:3] == ["One two three.", "Four five six seven!", "Eight nine ten eleven twelve?"]
    cut = finish_story(text, budget=7)
    assert cut == "One two three. Four five six seven!"
    assert finish_story("no end in sight", 20).endswith(".")
    dangling = "One two three four. Five six seven eight nine ten. And then she said something like \""
    assert finish_story(dangling, 20) == "One two three four. Five six seven eight nine ten."


def test_word_budget_stopping_is_per_row(tiny_teller):
    tok = tiny_teller.model.tokenizer
    rows = ["a b c d e f g h i j k.", "a b c"]
    ids = tok(rows, padding=True, return_tensors="pt").input_ids
    done = WordBudget(tok, budget=10)(ids, None)
    assert done.tolist() == [True, False]


def test_instruction_mentions_every_caption_in_order():
    text = build_instruction(["a dog on a beach", "a boy with a kite"], "friendship", "an adventure story",
                             "hopeful and warm", "young children", 150, None)
    assert text.index("a dog on a beach") < text.index("a boy with a kite")
    assert text.count("<image>") == 2 and "150 words" in text and "friendship" in text


def test_storyteller_decodes_with_fast_decoder_and_int8_weights(tiny_model):
    teller = StoryTeller(tiny_model, dtype="float32", quantize="int8", compile=False)
    assert teller.fast is not None and teller.fast.quantize == "int8"
    first = teller.generate_story(make_photo(0), seed=3, **FAST)
    again = teller.generate_story(make_photo(0), seed=3, **FAST)
    assert first.story == again.story and first.settings["quantize"] == "int8"


def test_fast_decoder_equals_transformers_for_greedy_stories(tiny_model):
    """The exact FastDecoder path writes the story transformers.generate writes, token for token."""
    fast = StoryTeller(tiny_model, dtype="float32", compile=False)
    result = fast.generate_story(make_photo(1), do_sample=False, num_candidates=1, length=20, max_new_tokens=24)
    fast.fast = None  # fall back to transformers.generate on the same model
    reference = fast.generate_story(make_photo(1), do_sample=False, num_candidates=1, length=20, max_new_tokens=24)
    assert result.story == reference.story


def test_int4_needs_a_decoder_it_can_pack(tiny_model):
    with pytest.raises(ValueError, match="int4"):
        StoryTeller(tiny_model, dtype="float32", quantize="int4")  # tiny hidden size 48 is not a multiple of 32


def test_grounding_helper_scores_text_against_images(tiny_teller):
    score = tiny_teller.grounding("a striped picture", [make_photo(0)])
    assert -1.0 <= score <= 1.0
    assert torch.is_tensor(tiny_teller.model.logit_scale)


def test_abandoned_stream_stops_decoding_before_releasing_the_model(tiny_teller, monkeypatch):
    import threading

    from mmstory import generation

    monkeypatch.setattr(generation, "settled_text", lambda text, budget, *shape: text)  # emit every piece at once
    stream = tiny_teller.stream_result(make_photo(7), seed=0, length=400, max_new_tokens=2000)
    first = next(stream)
    assert isinstance(first, str)  # decoding is under way
    stream.close()
    assert not any(t.name == "mmstory-decode" and t.is_alive() for t in threading.enumerate())
    assert tiny_teller._lock.acquire(blocking=False)
    tiny_teller._lock.release()


def test_seed_out_of_range_is_refused(tiny_teller):
    with pytest.raises(StoryInputError, match="seed"):
        tiny_teller.generate_story(make_photo(0), seed=2**70, **FAST)


def test_story_without_visual_prefix_writes_from_captions_only(tiny_model):
    tiny_model.generation_config.story_prefix = False
    teller = StoryTeller(tiny_model, dtype="float32")
    result = teller.generate_story([make_photo(0), make_photo(1)], seed=0, **FAST)
    assert len(result.captions) == 2 and isinstance(result.story, str)
    text = build_instruction(["a", "b"], None, None, None, None, 50, None, with_images=False)
    assert "<image>" not in text


def test_run_on_sentence_is_cut_at_a_clause_not_dropped():
    text = ("The boy stood there in the sun. " + "He walked on and on, past the old mill, past the river, "
            "past the hills where the sheep slept, and further still into the night without stopping once")
    story = finish_story(text, budget=20)
    assert story.startswith("The boy stood there in the sun. He walked on and on")
    assert story.endswith(".") and 14 <= len(story.split()) <= 23


def test_request_longer_than_the_writer_context_is_refused_clearly(tiny_teller):
    with pytest.raises(StoryInputError, match="context"):  # the tiny decoder: 4,096 positions of one byte each
        tiny_teller.generate_story(make_photo(0), previous="and then " * 2000, **FAST)


def test_a_story_that_goes_on_to_a_photo_of_its_own_is_cut_there():
    text = ("The boy ran into the woods. He jumped on a rock and laughed. Photo 2: A family gathers around their "
            "backyard after their morning meal.")
    assert finish_story(text, budget=20) == "The boy ran into the woods. He jumped on a rock and laughed."


def test_a_story_that_goes_on_to_a_chat_turn_of_its_own_is_cut_there():
    text = "The cat was happy in the room. She slept by the window. user\nWhat about those cute photos?"
    assert finish_story(text, budget=20) == "The cat was happy in the room. She slept by the window."
    glued = "They all enjoyed watching each other's faces!user\nThe woman with her boyfriend."
    assert finish_story(glued, budget=20) == "They all enjoyed watching each other's faces!"
    listing = "What a cute little dog he was. Let's get some photos of him soon! Photos: A big puppy with a toy."
    assert finish_story(listing, budget=20) == "What a cute little dog he was. Let's get some photos of him soon!"


def test_the_kept_story_names_what_the_caption_shows_and_not_what_it_does_not():
    caption = ["A brown dog runs through the grass with a red ball."]
    words = " ".join(["and then it was time to go home"] * 3)
    names_it = f"The brown dog ran through the grass after the red ball, {words}."
    vague = f"We went out for the day and it was fun, {words} again."
    invents = f"The brown dog ran through the grass to a car, a boat and a horse, {words}."
    agreement, open_, budget = [0.3, 0.3, 0.3], [False, False, False], 40
    assert pick_candidate([vague, names_it], caption, [[]], agreement[:2], open_[:2], budget) == 1
    assert pick_candidate([invents, names_it], caption, [[]], agreement[:2], open_[:2], budget) == 1
    # the classifier's sure classes count as seen; the filter and the length request come first
    assert pick_candidate([names_it, invents], caption, [["car", "boat", "horse"]], [0.3, 0.5], open_[:2],
                          budget) == 1
    assert pick_candidate([names_it, vague], caption, [[]], agreement[:2], [True, False], budget) == 1
    assert pick_candidate([names_it, vague], caption, [[]], agreement[:2], open_[:2], 120) in (0, 1)


def test_finish_story_drops_the_requests_class_line_echoed():
    story = finish_story("A microwave in the air. Also seen: microwave. The microwave hummed all night.", 80)
    assert story == "A microwave in the air. The microwave hummed all night."


def test_writer_likelihood_adds_up_each_rows_chosen_tokens_until_its_end_of_text():
    eos = 3
    recorder = WriterLikelihood(eos)
    steps = [torch.randn(2, 5) for _ in range(4)]
    chosen = torch.tensor([[1, 2, 4, 0], [eos, 2, 2, 2]])  # the second row ends at its first token
    for t, scores in enumerate(steps):
        assert recorder(chosen[:, :t], scores) is scores  # it only records
    logp = [step.log_softmax(-1) for step in steps]
    first = sum(float(logp[t][0, chosen[0, t]]) for t in range(3)) / 3  # the last token has no next step
    assert recorder.mean() == pytest.approx([first, float(logp[0][1, eos])], abs=1e-5)


def test_the_likelier_candidate_wins_a_tie_when_likelihood_is_weighed():
    caption = ["A brown dog runs through the grass."]
    stories = [f"The brown dog ran through the grass. It was {word}." for word in ("happy", "glad")]
    tie = dict(captions=caption, hints=[[]], agreement=[0.3, 0.3], blocked=[False, False], budget=10)
    assert pick_candidate(stories, **tie, likelihood=[-2.5, -1.9], likelihood_weight=1.0) == 1
    assert pick_candidate(stories, **tie, likelihood=[-1.9, -2.5], likelihood_weight=1.0) == 0
    assert pick_candidate(stories, **tie, likelihood=[-2.5, -1.9], likelihood_weight=0.0) == 0  # off: the first


def test_a_story_that_reaches_its_ending_is_kept_over_one_cut_off_after_the_turn():
    caption = ["A brown dog runs through the grass."]
    cut = "The brown dog ran through the grass. It wanted the ball. Then, all of a sudden, it began to rain hard."
    ends = "The brown dog ran through the grass. It wanted the ball. But it rained. In the end, it found the ball."
    tie = dict(captions=caption, hints=[[]], agreement=[0.3, 0.3], blocked=[False, False], budget=20)
    assert pick_candidate([cut, ends], **tie, likelihood=[-1.0, -3.0], likelihood_weight=1.0) == 1
    assert reaches_ending("At last, sleepy and happy, the cat slept.") and not reaches_ending(cut)


def test_likelihood_weighed_picking_runs_through_the_teller(tiny_teller, monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen["likelihood"] = args[6]
        return pick_candidate(*args, **kwargs)

    monkeypatch.setattr("mmstory.generation.pick_candidate", spy)
    monkeypatch.setattr(tiny_teller.model.generation_config, "story_pick_likelihood", 1.0)
    result = tiny_teller.generate_story(make_photo(2), seed=3, **FAST)
    assert len(seen["likelihood"]) == 2 and all(-30 < x < 0 for x in seen["likelihood"])
    assert result.story in result.candidates


def test_a_story_that_drifts_at_the_end_loses_to_one_that_drifts_at_the_start():
    caption = ["A brown dog runs through the grass."]
    on = "The brown dog ran through the grass."
    late = f"{on} {on.replace('brown', 'happy')} It was fun. It ran on. Then a car came by a boat and a horse."
    early = f"{on} Then a car came by a boat and a horse. It was fun. It ran on. The dog ran home through the grass."
    assert len(late.split()) == len(early.split())
    assert pick_candidate([late, early], caption, [[]], [0.3, 0.3], [False, False], 40) == 1


# --- opening with the caption ----------------------------------------------------------------------------------
def test_story_opening_is_the_caption_unless_the_style_or_a_continuation_sets_the_start():
    from mmstory.prompts import story_opening

    assert story_opening("a dog is running on the beach", None, None) == "A dog is running on the beach."
    assert story_opening("A dog runs.", "mystery", None) == "A dog runs."
    assert story_opening("A dog runs.", "Fairy Tale", None) == ""  # "beginning with 'Once upon a time'"
    assert story_opening("A dog runs.", "poem", None) == ""
    assert story_opening("A dog runs.", "custom: a limerick", None) == ""
    assert story_opening("A dog runs.", None, "The story so far.") == ""
    assert story_opening("  ", None, None) == ""


@pytest.mark.parametrize("caption, opening", [
    ("A plate.", "There was a plate."),
    ("Some food in a restaurant.", "There was some food in a restaurant."),
    ("Two trains on the street.", "There were two trains on the street."),
    ("Some apples in a bowl.", "There were some apples in a bowl."),
    ("A ski on the beach.", "There was a ski on the beach."),  # a word after an article is a noun
    ("A skateboarder doing a trick in the air.", "There was a skateboarder doing a trick in the air."),
    ("The grass.", "The grass."),  # "There was the grass." is worse
    ("A man in a blue shirt stands on the street.", "A man in a blue shirt stands on the street."),
    ("An animal skis down a mountain.", "An animal skis down a mountain."),
    ("A dog is running in a building.", "A dog is running in a building."),
])
def test_a_caption_without_a_verb_opens_the_story_as_a_sentence(caption, opening):
    from mmstory.prompts import story_opening

    assert story_opening(caption, None, None) == opening


@pytest.mark.parametrize("stream", [False, True])
def test_a_story_opens_with_the_first_caption_when_the_config_says_so(tiny_teller, stream):
    tiny_teller.model.generation_config.open_with_caption = True
    photos = [make_photo(4), make_photo(5)]
    if stream:
        *chunks, result = list(tiny_teller.stream_result(photos, seed=3, length=30, max_new_tokens=24))
        assert "".join(chunks) == result.story
    else:
        result = tiny_teller.generate_story(photos, seed=3, length=30, max_new_tokens=24, num_candidates=2)
    from mmstory.prompts import story_opening

    opening = story_opening(result.captions[0], None, None).rstrip(".")  # "There was <a caption without a verb>"
    assert result.captions[0].strip(), "the tiny model wrote an empty caption: pick another photo"
    assert result.story.lower().startswith(opening.lower()), (result.captions, result.story)
    assert all(c.lower().startswith(opening.lower()) for c in result.candidates)
    tiny_teller.model.generation_config.open_with_caption = False
    plain = tiny_teller.generate_story(photos, seed=3, length=30, max_new_tokens=24, num_candidates=2)
    assert not all(c.lower().startswith(opening.lower()) for c in plain.candidates)


def test_avoided_words_stay_out_of_every_candidate(tiny_teller):
    from mmstory.avoided_words import word_token_ids

    tokenizer = tiny_teller.model.tokenizer  # the tiny model's byte-level vocabulary: its words are letters
    settings = dict(seed=5, length=30, max_new_tokens=30, num_candidates=3)
    free = tiny_teller.generate_story(make_photo(7), **settings)
    avoid = sorted({ch.lower() for c in free.candidates for ch in c if ch.isascii() and ch.isalpha()})[:4]
    assert avoid, free.candidates
    ids = word_token_ids(tokenizer, avoid)
    assert {tokenizer(w, add_special_tokens=False).input_ids[0] for w in avoid} <= set(ids)
    tiny_teller.model.generation_config.story_avoid_words = avoid
    try:
        kept = tiny_teller.generate_story(make_photo(7), **settings)
    finally:
        tiny_teller.model.generation_config.story_avoid_words = []
    for candidate in kept.candidates:
        assert not {ch.lower() for ch in candidate} & set(avoid), candidate


def test_finish_story_keeps_closing_quotes():
    text = 'He says: "I am glad to see you." The man replies: "It is late." Then they went home and ate some soup.'
    assert finish_story(text, 30) == text
    assert finish_story(text, 14) == 'He says: "I am glad to see you." The man replies: "It is late."'


def test_finish_story_closes_a_quotation_the_budget_cut_off():
    text = 'The boy asked: "Do you have any food?" The man said: "Yes. I am very hungry. Come in and eat with us."'
    assert finish_story(text, 12) == 'The boy asked: "Do you have any food?" The man said: "Yes."'
    assert finish_story(text, 80) == text  # closed already: nothing added
    assert finish_story("She said: “Good night. Sleep well now, little one.”", 5) == "She said: “Good night.”"


def test_a_streams_settled_part_leaves_a_quotation_open_until_the_end():
    full = 'He said: "I am here. And then we went home." She smiled at him.'
    settled = settled_text('He said: "I am here. And then', 80)
    assert settled == 'He said: "I am here.' and finish_story(full, 80).startswith(settled)


def test_finish_story_drops_a_sentence_said_twice():
    text = "A cat sits on a wall. A cat sits on a wall. It watches the birds. It watches  the birds. Then it sleeps."
    assert finish_story(text, 80) == "A cat sits on a wall. It watches the birds. Then it sleeps."


def test_people_enter_a_story_only_where_a_picture_or_the_request_has_them():
    strict = GenerationConfig(story_people_from_pictures=True)
    fruit = CaptionChoice("Some fruit on a table.", 0.8, True, 0.1, [], [], people=False)
    man = CaptionChoice("A man on a bench.", 0.5, True, 0.1, [], [], people=True)
    assert not people_shown([fruit], None, None, strict)
    assert people_shown([fruit, man], None, None, strict)  # one picture of several is enough
    assert people_shown([fruit], "A story about my grandmother.", None, strict)
    assert people_shown([fruit], None, "The baker took the fruit home.", strict)
    assert people_shown([fruit], None, None, GenerationConfig())  # off: the writer may bring people in
    assert names_person("Two zookeepers") and not names_person("The zebra and the season")


def test_a_story_keeps_to_the_sex_its_pictures_show():
    man = CaptionChoice("A man in a red shirt is sitting on a bench.", 0.5, True, 0.1, [], [], people=True)
    girls = CaptionChoice("Two girls are swinging on a tire swing.", 0.5, True, 0.1, [], [], people=True)
    dog = CaptionChoice("A dog runs on the grass.", 0.5, True, 0.1, [], [], people=False)
    assert other_sex_words([man], None, None) == FEMALE_WORDS and "mother" in FEMALE_WORDS
    assert other_sex_words([girls, dog], None, None) == MALE_WORDS
    assert other_sex_words([man, girls], None, None) == ()  # both shown
    assert other_sex_words([dog], None, None) == ()  # nobody shown: the person rule's business
    assert other_sex_words([man], "A story about him and his grandmother.", None) == ()  # the request names her
    assert sexes_named("A man with his daughter") == {"male", "female"} and sexes_named("Shell, hero") == set()


def test_first_person_is_recognised_as_a_word_not_a_letter():
    assert first_person("I saw it.") and first_person("Tell it as we lived it") and first_person("my dog")
    assert not first_person("Ice on the river, music in the mist.") and not first_person(None)
