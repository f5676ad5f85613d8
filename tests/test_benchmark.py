"""The benchmark's story rows drive the real StoryTeller both ways (numbers are not checked: speed lives in reports)."""

from __future__ import annotations

from conftest import make_photo

from mmstory.decoding import FastDecoder
from mmstory.eval.benchmark import run_stories


def test_story_rows_compare_transformers_and_fast_decoding_and_restore_the_teller(tiny_teller):
    own = tiny_teller.fast
    fast = FastDecoder(tiny_teller.model.writer, quantize="int8", compile=False)
    rows = run_stories(tiny_teller, fast, [make_photo(0), make_photo(1), make_photo(2)], words=20, repeats=1)
    assert [(r["name"], r["images"]) for r in rows] == [
        ("StoryTeller, transformers.generate", 1), ("StoryTeller, transformers.generate", 3),
        ("StoryTeller, FastDecoder int8", 1), ("StoryTeller, FastDecoder int8", 3)]
    assert all(r["generate_s"] > 0 and r["words"] > 0 for r in rows)
    assert tiny_teller.fast is own
