"""scripts/prepare_story_mix.py's TinyStories reader: where a story starts in paragraphs that carry no boundary, the
capitals of the lower-cased copy, and the caption-like line a story is told from. The text here is written for the
test."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from prepare_story_mix import lowercased_tiny_stories, recase, tiny_records, tiny_scene, tiny_stories  # noqa: E402

TEXT = """Once upon a time, there was a small red boat named Pip. Pip liked the calm lake.

One day, a storm came. Pip was scared, but he sailed home.

One day, a little goat named Bea found a hat. She put it on her horn.

Bea showed the hat to Pip. \u00e2\u20ac\u0153Look!\u00e2\u20ac\u009d she said.

One day, Bea and the boat went to the shore. They sat in the sun.

There was a tall tree by the road. Birds sang in it every morning.
"""


def test_stories_start_at_an_opening_or_a_new_named_character():
    stories = tiny_stories(TEXT)
    assert [s.split(".")[0] for s in stories] == ["Once upon a time, there was a small red boat named Pip",
                                                  "One day, a little goat named Bea found a hat",
                                                  "There was a tall tree by the road"]
    assert "One day, a storm came." in stories[0]  # "One day" without a new name goes on the same story
    assert "One day, Bea and the boat went" in stories[1]
    assert '"Look!" she said.' in stories[1]  # mis-decoded quotes mended


def test_the_scene_is_the_first_sentence_without_the_formula_or_the_name():
    assert tiny_scene("Once upon a time, there was a small red boat named Pip. Pip liked it.") == "A small red boat."
    assert tiny_scene("One day, a little goat named Bea found a hat. It was red.") == "A little goat found a hat."
    assert tiny_scene("There was a tall tree by the road.") == "A tall tree by the road."


def test_records_keep_the_length_asked_and_the_writers_form():
    rows = tiny_records(tiny_stories(TEXT), min_words=14, max_words=30, vocab=None, rng=random.Random(0))
    assert [r["scenes"] for r in rows] == [["A small red boat."], ["A tall tree by the road."]]  # 29 and 14 words
    assert all(r["source"] == "tinystories" and r["story"] and r["audience"] in (None, "children") for r in rows)


def test_the_lower_cased_copy_gets_its_capitals_back():
    story = ('one day, a girl named lily saw her mom. "mom, can i play?" she asked. mom said, "yes." '
             '"why?" the bird asked. lily smiled.')
    assert recase(story, {"lily"}) == ('One day, a girl named Lily saw her mom. "Mom, can I play?" she asked. Mom '
                                       'said, "Yes." "Why?" the bird asked. Lily smiled.')


def test_the_lower_cased_copy_leaves_out_the_stories_the_cased_copy_has():
    known = tiny_stories(TEXT)
    text = ("once upon a time, there was a small red boat named pip. pip liked the calm lake.\n\none day, a storm "
            "came. pip was scared, but he sailed home.\n"
            "a cat named tom sat on a mat. tom was happy.\n\ntom slept.\n"
            "a dog named tom ran. tom ran fast.\n")
    assert lowercased_tiny_stories(text, known) == ["A cat named Tom sat on a mat. Tom was happy. Tom slept.",
                                                    "A dog named Tom ran. Tom ran fast."]


def test_own_stories_kept_by_a_reader_become_writer_records(tmp_path):
    import argparse

    from own_stories import keep, sheet

    from mmstory.train.writer import read_stories

    rows = [{"image": f"{i}.jpg", "request": {"style": "bedtime"} if i == 2 else {}, "caption": f"A dog number {i}.",
             "sure": True, "trace": [], "story": f"A dog number {i}. It wanted a bone. In the end, it found one."}
            for i in range(1, 13)]
    written = tmp_path / "shard0.jsonl"
    written.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sheet(argparse.Namespace(files=[written], out=tmp_path / "sheet.md"))
    text = (tmp_path / "sheet.md").read_text()
    assert "2. [style: bedtime] A dog number 2." in text and "dog number 12" in text and ".jpg" not in text
    (tmp_path / "kept.txt").write_text("2\n5\n7\n8\n9\n10\n11\n12\n3\n4\n99\n")  # 99: not on the sheet
    keep(argparse.Namespace(files=[written], kept=tmp_path / "kept.txt", out=tmp_path / "own"))
    train, dev = read_stories(tmp_path / "own" / "train.jsonl"), read_stories(tmp_path / "own" / "dev.jsonl")
    assert (len(train), len(dev)) == (9, 1)
    kept = {r["scenes"][0]: r for r in train + dev}
    assert "A dog number 1." not in kept and "A dog number 6." not in kept
    assert kept["A dog number 2."]["style"] == "bedtime" and kept["A dog number 5."]["style"] is None
