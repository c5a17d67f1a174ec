"""Files: written atomically (a reader never sees a half-written reconstruction or graph), and
``.npz`` archives read without unpickling, every failure a typed error."""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Callable, Collection

import numpy as np

from .errors import InputError

__all__ = ["atomic_write", "read_npz"]

# what np.load raises on a damaged archive or member (zlib.error: a corrupt compressed member)
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_npz(path: Path, what: str, bad: Callable[[Path, str], InputError], required: Collection[str],
             wanted: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path``, without unpickling (``wanted`` of them; default all).

    InputError when there is no such file; ``bad(path, why)`` when it is not a zip archive, an
    array cannot be read (a damaged or pickled member), or a ``required`` member is missing."""
    if not path.is_file():
        raise InputError(f"cannot read {what} {path}: there is no such file")
    if not zipfile.is_zipfile(path):
        raise bad(path, "it is not a .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            arrays = {k: z[k] for k in z.files if wanted is None or k in wanted}
    except READ_ERRORS as e:
        raise bad(path, f"its arrays cannot be read ({' '.join(str(e).split())})") from e
    if missing:
        raise bad(path, f"the member(s) {', '.join(missing)} are missing")
    return arrays
