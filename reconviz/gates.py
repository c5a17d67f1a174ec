"""The gates (ReLU family, max pooling) live in :mod:`reconviz.ops.gates`; this name stays importable."""

from .ops.gates import *  # noqa: F401,F403
from .ops.gates import __all__  # noqa: F401
