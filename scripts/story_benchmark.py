"""Story benchmark (logic in mmstory.eval.story_benchmark):

    python scripts/story_benchmark.py --images 48 --out docs/story-benchmark.json [--variant NAME=MODEL ...]
    python scripts/story_benchmark.py --from-json docs/story-benchmark.json
"""

import sys

from mmstory.eval.story_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
