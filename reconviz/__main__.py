"""``python -m reconviz``: the command line (see :mod:`reconviz.cli`)."""

import sys

from .cli import main

sys.exit(main())
