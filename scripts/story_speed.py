"""Seconds per story as served: mmstory-small, int4 writer, default decoding (6 candidates), after warm-up.

    python scripts/story_speed.py [--threads 2] [--repeats 3] [--model mmstory-small runs/writer_tiny/best]

Prints each story's total seconds and words, then the median per length (a short story and a 200-word one), for
each model in turn, so a new writer and its baseline are timed in one run.
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
    parser.add_argument("--model", nargs="+", default=["mmstory-small"], help="packaged names or directories")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = example_image(args.example)
    for model in args.model:
        teller = StoryTeller.from_pretrained(model, quantize="int4")
        teller.warmup()
        for length in ("short", 200):
            seconds = []
            for seed in range(args.repeats):
                result = teller.generate_story(image, length=length, seed=seed)
                seconds.append(result.timings["total_s"])
                print(f"{model} {length}: seed {seed}, {seconds[-1]:.2f} s, {len(result.story.split())} words",
                      flush=True)
            print(f"{model} {length}: median {statistics.median(seconds):.2f} s over {args.repeats}")


if __name__ == "__main__":
    main()
