"""Run the reconviz benchmark: ``python benchmarks/run.py [--quick] [...]``.

The benchmark itself is ``bench.py`` beside this file (not part of the installed
package); see ``--help``, benchmarks/README.md and docs/performance.md. Its child
processes run this script too (``--child``).
"""

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))  # reconviz from this checkout, installed or not
sys.path.insert(0, str(here))  # bench.py

from bench import main  # noqa: E402

if __name__ == "__main__":
    main()
