"""``python -m deepmetric ...`` (also ``torchrun -m deepmetric train ...``)."""

import sys

from deepmetric.cli import main

if __name__ == "__main__":
    sys.exit(main())
