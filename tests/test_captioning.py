"""The caption policy (mmstory.caption_policy), the ImageNet word table (mmstory.imagenet_words) and the caption
decoder's added words (mmstory.caption_decoder), with synthetic class probabilities and a tiny decoder."""

import pytest
import torch

from mmstory import caption_search
from mmstory.caption_decoder import CaptionDecoder
from mmstory.caption_policy import CaptionPolicy
from mmstory.caption_text import caption_subject, place, says_twice, trim
from mmstory.config import GenerationConfig
from mmstory.imagenet_words import imagenet_words, plural

ZEBRA, ORANGE, BANANA, LEMON, CHEETAH, GOLDEN_RETRIEVER, TABBY, ESPRESSO, JERSEY = (340, 950, 954, 951, 293, 207,
                                                                                     281, 967, 610)
LUMBERMILL, VALLEY, SORREL, CHAIR, EGRET = 634, 979, 339, 423, 132


def probs_of(**classes: float) -> torch.Tensor:
    """Class probabilities sure of the given classes (by index name above), the rest spread over twenty unrelated
    objects (ImageNet's 480-499: cash machine ... cleaver), none of them sure."""
    probs = torch.zeros(1000)
    chosen = {globals()[k.upper()]: v for k, v in classes.items()}
    probs[480:500] = (1 - sum(chosen.values())) / 20
    for index, p in chosen.items():
        probs[index] = p
    return probs


def policy(**settings) -> CaptionPolicy:
    table = imagenet_words()
    forms = {w.text: (10_000 + 2 * i, 10_001 + 2 * i) for i, w in enumerate(table.words)}  # stand-in compact ids
    config = GenerationConfig(caption_class_check=0.5, caption_concepts=0.5, **settings)
    return CaptionPolicy(config, table, forms, opening=lambda word: (len(word),))


def test_the_word_table_pools_classes_that_share_a_word():
    table = imagenet_words()
    pooled = table.pooled(probs_of(orange=0.3, banana=0.25, lemon=0.2)[None])[0]
    assert table.confidence(pooled, "fruit") == pytest.approx(0.75, abs=0.01)
    word, p = table.sure_word(pooled, 0.5)
    assert word.text == "fruit" and p == pytest.approx(0.75, abs=0.01)  # no single fruit is sure; fruit is
    word, _ = table.sure_word(table.pooled(probs_of(zebra=0.8)[None])[0], 0.5)
    assert word.text == "zebra"  # the most specific sure word, not "animal"
    dog = table.words[table.index["dog"]]
    assert len(dog.classes) == 118 and table.class_word[GOLDEN_RETRIEVER] == "dog"
    assert [plural(w) for w in ("bus", "strawberry", "polar bear", "sheep")] == [
        "buses", "strawberries", "polar bears", "sheep"]


@pytest.mark.parametrize("caption, probs, expected_start", [
    # a sure animal the caption does not name: the caption is written again from it
    ("A black and white dog is in the grass.", dict(zebra=0.8), "A zebra"),
    ("A little boy is standing in the water.", dict(cheetah=0.7), "A cheetah"),
    # a sure thing replaces a person nothing supports, and an animal the classifier gives no weight
    ("A man in a blue shirt is sitting on a blanket.", dict(orange=0.4, banana=0.4), "Some fruit"),
    ("A brown dog is sitting on the floor.", dict(espresso=0.9), "Some coffee"),
])
def test_a_subject_the_classifier_contradicts_gives_way(caption, probs, expected_start):
    rules = policy()
    plan = rules.plan(probs_of(**probs)[None])[0]
    assert rules.revise(plan, caption, agreement=0.0)
    opening, word = expected_start.split(" ", 1)
    assert plan.prefix == (len(opening), rules.forms[word][0]) and plan.required is None
    assert "check" in plan.trace[0]


def test_a_caption_the_heads_agree_with_keeps_its_subject_and_the_word_is_not_forced():
    rules = policy(caption_check_agreement=0.0)
    caption = "A black and white dog is in the grass."
    plan = rules.plan(probs_of(zebra=0.8)[None])[0]
    assert not rules.revise(plan, caption, agreement=0.05)
    assert plan.prefix == () and plan.required is None and "left out" in plan.trace[0]
    plan = rules.plan(probs_of(zebra=0.8)[None])[0]
    assert rules.revise(plan, caption, agreement=-0.05) and plan.opening == "A zebra"  # the heads disagree
    plan = policy().plan(probs_of(zebra=0.8)[None])[0]
    assert policy().revise(plan, caption, agreement=0.05)  # None: the check never asks the heads


def test_a_more_general_subject_is_not_replaced_by_a_specific_one():
    rules = policy()
    plan = rules.plan(probs_of(egret=0.8)[None])[0]
    assert not rules.revise(plan, "A white bird is standing in the water.", agreement=-0.2)
    assert plan.prefix == () and plan.required is None and plan.trace == [
        "check: 'egret' (0.80) is a kind of the caption's bird"]
    plan = rules.plan(probs_of(egret=0.8)[None])[0]
    assert rules.revise(plan, "A white dog is standing in the water.", agreement=-0.2) and plan.opening == "An egret"


def test_a_rewritten_caption_may_not_bring_back_the_subject_the_classifier_ruled_out():
    dog_ids, person_ids = (5, 6), (7, 8)
    table, creatures = imagenet_words(), {"dog": dog_ids, "person": person_ids}
    forms = policy().forms
    rules = CaptionPolicy(GenerationConfig(caption_class_check=0.5, caption_ban_rejected=True), table, forms,
                          opening=lambda word: (len(word),), creatures=creatures)
    plans = rules.plan(torch.stack([probs_of(espresso=0.9), probs_of(golden_retriever=0.9)]))
    assert rules.revise(plans[0], "A brown dog is sitting on the floor.", agreement=0.0)
    assert plans[0].banned == dog_ids and plans[0].trace[-1] == "ban: no dog words after it"
    assert not rules.revise(plans[1], "A dog is running on the grass.", agreement=0.0) and plans[1].banned == ()
    bias = rules.ban_rejected(plans, None, size=20)
    assert bias[0, list(dog_ids)].eq(float("-inf")).all() and bias[0, list(person_ids)].eq(0).all()
    assert bias[1].eq(0).all()  # a caption that stands bans nothing
    off = CaptionPolicy(GenerationConfig(caption_class_check=0.5), table, forms, opening=lambda word: (len(word),),
                        creatures=creatures)
    plan = off.plan(probs_of(espresso=0.9)[None])[0]
    assert off.revise(plan, "A brown dog is sitting on the floor.", agreement=0.0) and plan.banned == ()
    assert off.ban_rejected([plan], None, size=20) is None


@pytest.mark.parametrize("caption, probs", [
    ("A dog is running on the grass.", dict(golden_retriever=0.9)),  # names the kind
    ("A man in a red shirt is throwing a ball.", dict(golden_retriever=0.7)),  # a person beside a dog
    ("A little boy is standing in the water.", dict(cheetah=0.3)),  # unsure
    ("A zebra is in the grass.", dict(zebra=0.9)),
])
def test_a_caption_that_agrees_or_an_unsure_class_is_kept(caption, probs):
    rules = policy()
    plan = rules.plan(probs_of(**probs)[None])[0]
    assert not rules.revise(plan, caption, agreement=0.0) or plan.required is not None
    assert plan.prefix == ()


@pytest.mark.parametrize("probs", [dict(lumbermill=0.7), dict(valley=0.8)])
def test_a_sure_place_is_never_made_the_subject(probs):
    rules = policy(caption_hedge=0.3, caption_hedge_agreement=0.0)
    plan = rules.plan(probs_of(**probs)[None])[0]
    rules.revise(plan, "A skateboarder is jumping over a fence.", agreement=-0.3)
    assert plan.prefix == ()  # not "A lumbermill is jumping ..."; at most the place is required as a word
    assert all(not step.startswith(("check", "hedge")) for step in plan.trace), plan.trace


def test_a_supported_person_keeps_the_subject_and_the_word_is_required():
    rules = policy()
    plan = rules.plan(probs_of(espresso=0.6, jersey=0.2)[None])[0]  # a jersey: a person is there
    assert rules.revise(plan, "A man in a red shirt is sitting at a table.", agreement=0.0)
    assert plan.prefix == () and plan.required == rules.forms["coffee"]


def test_an_animal_surer_than_the_captioned_one_takes_its_place():
    rules = policy(caption_animal_rival=0.15)
    plan = rules.plan(probs_of(zebra=0.24, golden_retriever=0.08)[None])[0]  # under the 0.5 check
    assert rules.revise(plan, "A black and white dog is jumping on a tree.", agreement=-0.4)
    assert plan.prefix == (1, rules.forms["zebra"][0]) and plan.trace[0].startswith("rival: 'zebra' (0.24)")
    for probs, caption in [(dict(zebra=0.24, golden_retriever=0.3), "A dog is running."),  # its own is surer
                           (dict(zebra=0.1), "A dog is running."),  # the rival is unsure
                           (dict(zebra=0.3), "A man is running."),  # a person is no animal to replace
                           (dict(zebra=0.3), "A zebra is running.")]:  # it names it already
        plan = rules.plan(probs_of(**probs)[None])[0]
        assert not rules.revise(plan, caption, agreement=0.0) or plan.prefix == (), (probs, caption)
    off = policy()
    assert not off.revise(off.plan(probs_of(zebra=0.24)[None])[0], "A dog is running.", agreement=0.0)


def test_the_hedge_names_only_what_is_sure():
    probs = probs_of(cheetah=0.2, zebra=0.2)
    rules = policy(caption_hedge=0.3, caption_hedge_agreement=0.0)
    plan = rules.plan(probs[None])[0]
    assert rules.revise(plan, "A man is sitting on the ground.", agreement=-0.3)
    assert plan.prefix == (2, rules.forms["animal"][0]) and "hedge" in plan.trace[0]  # "An animal"
    off = policy()
    assert not off.revise(off.plan(probs[None])[0], "A man is sitting on the ground.", agreement=-0.3)


def test_a_dog_the_breeds_barely_support_is_hedged_to_an_animal():
    probs = probs_of(golden_retriever=0.08, zebra=0.12, cheetah=0.12)  # an animal, no kind of it sure
    rules = policy(caption_hedge=0.2, caption_hedge_agreement=0.0, caption_animal_support=0.15)
    plan = rules.plan(probs[None])[0]
    assert rules.revise(plan, "A black and white dog is jumping over a fence.", agreement=-0.2)
    assert plan.prefix == (2, rules.forms["animal"][0]) and plan.trace[0].startswith("hedge")  # "An animal"
    assert not rules.revise(rules.plan(probs[None])[0], "A dog is running.", agreement=0.1)  # the image agrees
    lenient = policy(caption_hedge=0.2, caption_hedge_agreement=0.0)  # dog at 0.08 passes the default 0.05
    assert not lenient.revise(lenient.plan(probs[None])[0], "A dog is running.", agreement=-0.2)
    with pytest.raises(ValueError, match="caption_animal_support"):
        GenerationConfig(caption_animal_support=1.5)


def test_choose_reports_confidence_and_trace():
    rules = policy(caption_rerank=1.0)
    plan = rules.plan(probs_of(zebra=0.8)[None])[0]
    rules.revise(plan, "A dog is in the grass.", agreement=0.0)
    choice = rules.choose(plan, [(-1.0, "A zebra is standing in the grass."), (-0.9, "A zebra.")], [0.2, 0.0],
                          first_choice="A dog is in the grass.")
    assert choice.caption == "A zebra is standing in the grass."  # -1.0 + 1.0 x 0.2 beats -0.9 + 0
    assert choice.confidence == pytest.approx(0.8, abs=0.01) and choice.sure
    assert choice.words[0][0] == "animal" and "A dog is in the grass." in choice.trace[-1]
    assert caption_subject("A black and white dog is in the grass.") == 4
    assert not choice.people  # no person in the caption, none in the classes


def test_choose_says_whether_the_picture_shows_a_person():
    rules = policy()
    named = rules.choose(rules.plan(probs_of(zebra=0.8)[None])[0], [(-1.0, "A zookeeper feeds a zebra.")], [0.0])
    assert named.people  # the caption names one
    worn = rules.choose(rules.plan(probs_of(jersey=0.7)[None])[0], [(-1.0, "A red shirt on a line.")], [0.0])
    assert worn.people  # the classes vouch for one: a jersey is worn
    assert not rules.choose(rules.plan(probs_of(espresso=0.9)[None])[0], [(-1.0, "Some coffee.")], [0.0]).people


@pytest.mark.parametrize("caption, expected", [
    ("A woman is sitting on a buses.", "A woman is sitting on a bus."),
    ("A skis on the beach.", "A ski on the beach."),
    ("A man is standing next to a rackets.", "A man is standing next to a racket."),
    ("A baseball baseball player is running.", "A baseball player is running."),
    ("Two dogs are playing with buses.", "Two dogs are playing with buses."),  # a plural where a plural belongs
    ("A sheep is eating.", "A sheep is eating."),
    ("A elephant stands near an bus.", "An elephant stands near a bus."),
    ("A man in a uniform and an hat.", "A man in a uniform and an hat."),  # "u" and "h": left as written
])
def test_a_forced_word_reads_as_english(caption, expected):
    from mmstory.caption_text import tidy

    assert tidy(caption, imagenet_words().singular) == expected


def test_policy_switches_are_validated():
    with pytest.raises(ValueError, match="caption_hedge"):
        GenerationConfig(caption_hedge=2.0)


def test_added_words_borrow_their_donor_and_need_a_bias():
    torch.manual_seed(0)
    decoder = CaptionDecoder(tokenizer_size=50, vocab_size=None, token_dim=8, width=16, depth=1, heads=2,
                             max_length=8, dropout=0.0).eval()
    base = decoder.base_size
    decoder.set_added_words([[7, 8]], [decoder.SPECIALS + 5])  # a two-piece word that borrows compact id 9
    image = torch.randn(1, 3, 8)
    state = decoder.start(image)
    plain = decoder.step(state, torch.tensor([decoder.BOS]))
    assert plain.shape[1] == base + 1 and plain[0, base] == float("-inf")  # no bias: never written
    state = decoder.start(image)
    bias = torch.zeros(base + 1)
    biased = decoder.step(state, torch.tensor([decoder.BOS]), bias)
    assert biased[0, base] == biased[0, decoder.SPECIALS + 5]  # the donor's logit
    assert decoder.to_tokenizer([[decoder.SPECIALS + 1, base]]) == [[1, 7, 8]]
    # constrained beam search can write it, and a prefix puts it first
    rows = caption_search.candidates(decoder, image, 6, num_beams=3, required=[(base,)], logit_bias=bias[None])[0]
    assert all(base in ids for _, ids in rows)
    rows = caption_search.candidates(decoder, image, 6, num_beams=3, logit_bias=bias[None],
                                     prefixes=[(decoder.SPECIALS, base)])[0]
    assert all(ids[:2] == [decoder.SPECIALS, base] for _, ids in rows)
    with pytest.raises(ValueError, match="donor"):
        decoder.set_added_words([[1]], [base + 5])


def test_a_mass_noun_opening_takes_a_singular_verb():
    rules = policy()
    plan = rules.plan(probs_of(espresso=0.9)[None])[0]
    assert rules.revise(plan, "A brown dog is sitting on the floor.", agreement=0.0)
    choice = rules.choose(plan, [(-1.0, "Some coffee are sitting on a ledge.")], [0.0])
    assert choice.caption == "Some coffee is sitting on a ledge."


@pytest.mark.parametrize("caption, keep, expected", [
    ("A hot dog in front of a white boat.", 3, "A hot dog."),
    ("A zebra is riding a black horse.", 2, "A zebra."),  # a transitive verb goes with its object
    ("A trimaran is riding a snowboard on the ocean.", 2, "A trimaran on the ocean."),
    ("A toilet of a small white and brown dog are playing in the grass.", 2, "A toilet in the grass."),
    ("Some food in the water with a bird in its mouth", 2, "Some food in the water."),  # "its" was the bird's
    ("An elephant is walking with a large black and white dog.", 2, "An elephant is walking."),
    ("A cauliflower are playing with a small black dog.", 2, "A cauliflower."),  # "are" had no subject left
    ("A sink is standing in a kitchen.", 2, "A sink is standing in a kitchen."),  # nothing unseen: as written
])
def test_trim_drops_the_phrases_that_name_an_unseen_thing(caption, keep, expected):
    unseen = {"boat", "horse", "snowboard", "dog", "bird"}.__contains__
    assert trim(caption, keep, unseen)[0] == expected


@pytest.mark.parametrize("caption, expected", [
    ("A train is walking down the street.", "A train on the street."),
    ("An airplane is jumping into the air while another watches.", "An airplane in the air."),
    ("An airplane is playing with a stick.", "An airplane."),
    ("A sink is standing in a kitchen.", "A sink is standing in a kitchen."),  # things stand and sit in captions
])
def test_after_a_forced_thing_what_only_a_creature_does_goes(caption, expected):
    assert trim(caption, 2, lambda word: False, thing=True)[0] == expected
    assert trim(caption, 2, lambda word: False)[0] == caption  # an animal or a person may walk


def test_a_thing_the_decoder_made_a_person_keeps_its_action():
    rules = policy(caption_trim=0.05)
    plan = rules.plan(probs_of(espresso=0.9)[None])[0]
    assert rules.revise(plan, "A brown dog is sitting on the floor.", agreement=0.0)
    walking = rules.choose(plan, [(-1.0, "Some coffee is walking down the street.")], [0.0])
    assert walking.caption == "Some coffee on the street."
    person = rules.choose(plan, [(-1.0, "Some coffee man is walking down the street.")], [0.0])
    assert person.caption == "Some coffee man is walking down the street."


def test_a_forced_caption_loses_the_things_the_classifier_does_not_see():
    probs = probs_of(zebra=0.8)
    rules = policy(caption_trim=0.05)
    plan = rules.plan(probs[None])[0]
    assert rules.revise(plan, "A black and white dog is in the grass.", agreement=0.0) and plan.opening == "A zebra"
    beams = [(-1.0, "A zebra is riding a black horse in the grass.")]
    choice = rules.choose(plan, beams, [0.0])
    assert choice.caption == "A zebra in the grass." and choice.trace[-1].startswith("trim")
    off = policy()
    plan = off.plan(probs[None])[0]
    off.revise(plan, "A black and white dog is in the grass.", agreement=0.0)
    assert off.choose(plan, beams, [0.0]).caption == beams[0][1]  # caption_trim 0: as the decoder wrote it
    sure_horse = rules.plan(probs_of(zebra=0.5, sorrel=0.4)[None])[0]
    rules.revise(sure_horse, "A black and white dog is in the grass.", agreement=0.0)
    assert rules.choose(sure_horse, beams, [0.0]).caption == beams[0][1]  # a horse the classifier sees stays
    unforced = rules.plan(probs[None])[0]  # a caption that was not written again is the decoder's own
    assert rules.choose(unforced, [(-1.0, "A dog is riding a black horse.")], [0.0]).caption.startswith("A dog is")


@pytest.mark.parametrize("caption, subject, expected", [
    ("A brown dog is sitting in a room.", 2, "A room."),
    ("A yellow and white dog is standing in front of a graffiti.", 4, "A graffiti."),
    ("A grey-haired dog is sitting on the top of a wall.", 2, "A wall."),
    ("A dog is running next to a tree.", 1, "A tree."),
    ("A dog is walking through the grass.", 1, "The grass."),
    ("A dog is playing with a ball.", 1, None),  # "with" opens no place
    ("A dog runs.", 1, None),
    ("A brown dog is jumping in the air.", 2, None),  # the air is where a jump goes, not a place
    ("A dog is jumping into the air on the beach.", 1, "The beach."),
])
def test_place_is_the_first_place_after_the_subject(caption, subject, expected):
    assert place(caption, subject) == expected


def test_an_unsure_caption_with_an_animal_nothing_supports_names_only_its_place():
    probs = probs_of(golden_retriever=0.05, zebra=0.1, cheetah=0.1)  # no word sure, the breeds barely there
    rules = policy(caption_hedge=0.2, caption_hedge_agreement=0.0, caption_animal_support=0.15,
                   caption_place_when_unsure=True)
    choice = rules.choose(rules.plan(probs[None])[0], [(-1.0, "A brown dog is sitting in a room.")], [-0.2])
    assert choice.caption == "A room." and not choice.sure and choice.trace[-1].startswith("place")
    with_chair = rules.choose(rules.plan(probs_of(golden_retriever=0.05, cheetah=0.1, jersey=0.06, lumbermill=0.3,
                                                  chair=0.2)[None])[0],
                              [(-1.0, "A brown dog is sitting in a room.")], [-0.2])
    assert with_chair.caption == "A room." and with_chair.also == ["chair"]  # the writer is told of the chair
    assert not with_chair.people  # the guessed subject went; a person the jersey barely suggests does not fill it
    agrees = rules.choose(rules.plan(probs[None])[0], [(-1.0, "A brown dog is sitting in a room.")], [0.1])
    assert agrees.caption == "A brown dog is sitting in a room." and agrees.sure  # the image agrees: kept
    person = rules.choose(rules.plan(probs[None])[0], [(-1.0, "A man is sitting in a room.")], [-0.2])
    assert person.caption == "A man is sitting in a room."  # people are not judged by the classifier
    breeds = rules.choose(rules.plan(probs_of(golden_retriever=0.4)[None])[0],
                          [(-1.0, "A brown dog is sitting in a room.")], [-0.2])
    assert breeds.caption.startswith("A brown dog")  # the breeds vouch for the dog
    off = policy(caption_hedge=0.2, caption_hedge_agreement=0.0, caption_animal_support=0.15)
    assert off.choose(off.plan(probs[None])[0], [(-1.0, "A brown dog is sitting in a room.")], [-0.2]).caption == (
        "A brown dog is sitting in a room.")


def test_the_writers_english_picks_the_wording_but_not_what_is_named():
    rules = policy(caption_rerank=10.0, caption_fluency=4.0)
    beams = [(-5.0, "A surfer is surfing on the surf."), (-5.5, "A surfer is riding a wave."),
             (-5.6, "A dog is riding a wave."), (-5.4, "A surfer is riding a wave on a surfboard."),
             (-5.3, "A surfer is riding a wave on a wave.")]
    agreement = [0.1, 0.1, 0.1, 0.1, 0.1]
    assert rules.rerank(beams, agreement) == 0  # without the writer: the decoder's choice
    fluency = [-4.0, -2.0, -1.0, -1.5, -1.2]  # the dog, the surfboard and the repeat the writer finds likelier still
    assert rules.rerank(beams, agreement, fluency=fluency) == 1
    assert rules.choose(None, beams, agreement, fluency=fluency).caption == "A surfer is riding a wave."
    traced = rules.choose(rules.plan(probs_of(jersey=0.5)[None])[0], beams, agreement, fluency=fluency)
    assert traced.caption == "A surfer is riding a wave." and traced.trace == [
        "fluency: 'A surfer is riding a wave.' over 'A surfer is surfing on the surf.'"]
    off = policy(caption_rerank=10.0)  # caption_fluency 0: the scores change nothing
    assert off.rerank(beams, agreement, fluency=fluency) == 0
    assert rules.rerank(beams, [0.1, 0.1, 0.1, 0.1, 0.5], fluency=fluency) == 4  # the heads' own choice stays


def test_says_twice():
    assert says_twice("A shuttle is jumping into the air in the air.")
    assert says_twice("A man is sitting on a snow covered in the snow.")
    assert not says_twice("A man in a white shirt is standing by a white wall.")  # colours may repeat
    assert not says_twice("A dog is running on the grass.")
