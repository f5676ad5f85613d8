"""Record (or check) the packaged model's outputs that a refactor must not change.

    python scripts/record_behaviour.py                # writes tests/data/behaviour.json
    python scripts/record_behaviour.py --check        # compares against it
    python scripts/record_behaviour.py --out now.json # writes elsewhere (tests/test_behaviour.py compares that)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "behaviour.json"
STORY_EXAMPLES = ("chelsea", "coffee")


def record(teller=None) -> dict:
    from mmstory.examples import EXAMPLES, example_image
    from mmstory.generation import StoryTeller

    teller = teller or StoryTeller.from_pretrained("mmstory-small")
    names = list(EXAMPLES)
    captions = teller.caption([example_image(n) for n in names])
    stories = {n: teller.generate_story(example_image(n), seed=0).story for n in STORY_EXAMPLES}
    return {"model": "mmstory-small", "captions": dict(zip(names, captions)), "stories_seed0": stories}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the recorded file instead of writing it")
    parser.add_argument("--out", type=Path, default=FIXTURE, help=f"where to write (default: {FIXTURE})")
    args = parser.parse_args(argv)
    now = record()
    if args.check:
        before = json.loads(FIXTURE.read_text())
        print("same" if now == before else "DIFFERENT")
        return 0 if now == before else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(now, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
