"""``python -m difftime``: the same command line as ``difftime``."""

import sys

from difftime.cli import main

if __name__ == "__main__":
    sys.exit(main())
