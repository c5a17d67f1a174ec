"""Models that ship with reconviz (trained weights inside the package, no downloads).

>>> model, data = reconviz.models.digits()      # doctest: +SKIP
"""

from .digits import DigitsCNN, DigitsData, digits, load_data

__all__ = ["DigitsCNN", "DigitsData", "digits", "load_data"]
