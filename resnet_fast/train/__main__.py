"""``python -m resnet_fast.train``: see :mod:`resnet_fast.train.cli`."""

import sys

from resnet_fast.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
