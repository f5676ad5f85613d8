"""Story-decoding benchmark (the same as `mmstory bench`): python scripts/benchmark.py [--json out.json] [--quick]."""

import sys

from mmstory.eval.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
