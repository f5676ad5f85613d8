"""Train a StoryModel from a YAML config; the same as `mmstory train` (and usable with `accelerate launch`).

    python scripts/train.py --config mmstory/configs/flickr8k.yaml [--resume] [--output-dir DIR] [--max-steps N]
    accelerate launch --num_processes 2 scripts/train.py --config mmstory/configs/flickr8k.yaml
"""

import sys

from mmstory.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
