"""Seconds per story as served: mmstory-small, int4 writer, default decoding (6 candidates), after warm-up.

    python scripts/story_speed.py [--threads 2] [--repeats 3]

Prints each story's total seconds and words, then the median per length (a short story and a 200-word one).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mmstory.examples import example_image
from mmstory.generation import StoryTeller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--example", default="chelsea")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teller = StoryTeller.from_pretrained("mmstory-small", quantize="int4")
    teller.warmup()
    image = example_image(args.example)
    for length in ("short", 200):
        seconds = []
        for seed in range(args.repeats):
            result = teller.generate_story(image, length=length, seed=seed)
            seconds.append(result.timings["total_s"])
            print(f"{length}: seed {seed}, {seconds[-1]:.2f} s, {len(result.story.split())} words", flush=True)
        print(f"{length}: median {statistics.median(seconds):.2f} s over {args.repeats}")


if __name__ == "__main__":
    main()
