"""`python -m mmstory.train` (and `torchrun ... -m mmstory.train`): the same as `mmstory train`."""

import sys

from mmstory.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
