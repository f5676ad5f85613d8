"""Record (or check) the outputs that are the same on every CPU, so that a refactor that changes them is caught.

    python scripts/record_behaviour.py                # writes tests/data/behaviour.json
    python scripts/record_behaviour.py --check        # compares against it
    python scripts/record_behaviour.py --out now.json # writes elsewhere (tests/test_behaviour.py compares that)

Recorded exactly: the packaged model's captions of the bundled examples (beam search), its greedy short story, and
the tiny random model's greedy story and, along a fixed sentence, its writer's most likely next tokens (token ids;
float32, eager). Not recorded: sampled stories and the greedy answer (its second sentence holds a near tie that two
CPUs broke differently). Sampling over float logits depends on the CPU's kernels and the thread count, so a sampled
story recorded on one machine is not reproduced on another; `--out` adds them under "sampled" for
tests/test_behaviour.py to check by property (the same seed twice in one process gives the same story, its length,
its opening, no avoided words; the answer opens with the caption and goes on about the cat or its class).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "behaviour.json"
STORY_EXAMPLES = ("chelsea", "coffee")
QUESTION = "What is in the picture?"
TINY_TEXT = "A black and white cat is sitting on the top of a wall."  # fixed: not a caption that may change
EXACT = ("model", "captions", "greedy", "tiny")  # the keys compared character for character


def record(teller=None) -> dict:
    """The deterministic outputs (the EXACT keys)."""
    import torch

    from mmstory import create_model
    from mmstory.examples import EXAMPLES, example_image
    from mmstory.generation import StoryTeller

    teller = teller or StoryTeller.from_pretrained("mmstory-small")
    names = list(EXAMPLES)
    captions = teller.caption([example_image(n) for n in names])
    chelsea = example_image("chelsea")
    greedy = {"chelsea_story": teller.generate_story(chelsea, length=20, num_candidates=1, do_sample=False).story}
    torch.manual_seed(0)
    tiny = StoryTeller(create_model("tiny"), dtype="float32", compile=False)
    story = tiny.generate_story(chelsea, length=20, max_new_tokens=32, num_candidates=1, do_sample=False).story
    tokenizer = tiny.model.tokenizer
    with torch.no_grad():  # the writer's forward pass, teacher-forced: its most likely next token at each position
        ids = tokenizer(TINY_TEXT, return_tensors="pt").input_ids
        forward = tiny.model.writer(input_ids=ids).logits.argmax(-1)[0].tolist()
    tiny_out = {"story_ids": tokenizer(story, add_special_tokens=False).input_ids, "forward_argmax": forward}
    return {"model": "mmstory-small", "captions": dict(zip(names, captions)), "greedy": greedy, "tiny": tiny_out}


def sample(teller) -> dict:
    """Sampled stories, each written twice with the same seed, with what their properties are checked against."""
    from mmstory.examples import example_image
    from mmstory.prompts import LENGTHS, story_opening

    config = teller.model.generation_config
    out = {}
    for name in STORY_EXAMPLES:
        first, again = (teller.generate_story(example_image(name), seed=0) for _ in range(2))
        opening = story_opening(first.captions[0], None, None) if config.open_with_caption else ""
        out[name] = {"story": first.story, "again": again.story, "opening": opening, "budget": LENGTHS["short"],
                     "avoided": list(config.story_avoid_words)}
    answer = teller.answer(example_image("chelsea"), QUESTION)
    out["answer"] = {"answer": answer.answer, "caption": answer.captions[0]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the recorded file instead of writing it")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write (default: {FIXTURE}); elsewhere, "
                                                                "the sampled stories are added")
    args = parser.parse_args(argv)
    from mmstory.generation import StoryTeller

    teller = StoryTeller.from_pretrained("mmstory-small")
    now = record(teller)
    if args.check:
        before = {key: value for key, value in json.loads(FIXTURE.read_text()).items() if key in EXACT}
        print("same" if now == before else "DIFFERENT")
        return 0 if now == before else 1
    if args.out is not None:
        now["sampled"] = sample(teller)
    out = args.out or FIXTURE
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(now, indent=2, ensure_ascii=False)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    out.write_text(text + "\n")  # token ids on one line each
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
