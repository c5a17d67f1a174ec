"""Run the reconviz benchmark: ``python benchmarks/run.py [--quick] [...]``.

The same as ``python -m reconviz.bench``; see ``--help`` and docs/performance.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reconviz.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
