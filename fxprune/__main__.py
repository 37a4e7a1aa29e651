"""``python -m fxprune``: the command line (see :mod:`fxprune.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
