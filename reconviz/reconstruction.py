"""Stage 4 — the result: the affine model f(x) = W x + b at each probe.

A :class:`Reconstruction` is plain data: ``weight`` (N, K, *sample_shape),
``bias`` (N, K), the reconstructed ``classes``, the original ``logits`` at the
probes and the ``probes`` themselves, plus metadata (method, basis, dtype,
tolerance, measured errors). It saves to ``.npz`` atomically and loads without
executing code (``allow_pickle=False``).

A W too large for the memory budget lives in a memory-mapped ``.npy`` file
(:class:`MappedWeight`): ``weight`` is then a CPU tensor over the mapping, and
every method below works on it class block by class block, handing the pages
back after each block, so resident memory stays at one block, not the size of W.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ExactnessError, InputError

__all__ = ["Reconstruction", "MappedWeight", "tolerance_for", "atomic_write"]

FORMAT = "reconviz.reconstruction/1"
BLOCK_BYTES = 64 * 2**20  # bytes of a mapped W touched at once before its pages are handed back


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance of the exactness contract: |Wx+b - f(x)| <= tol * max(1, |f(x)|)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def relative_error(a: Tensor, ref: Tensor) -> Tensor:
    """|a - ref| / max(1, |ref|), elementwise."""
    return (a - ref).abs() / ref.abs().clamp_min(1.0)


class MappedWeight:
    """An array in a memory-mapped ``.npy`` file: W of a solve that streams to disk.

    ``tensor`` is a CPU tensor over the mapping (writes go to the file through
    the page cache). :meth:`release` hands the resident pages back (``madvise
    MADV_DONTNEED``: for a shared file mapping the data stay in the file and the
    page cache), so a process that writes or reads W block by block keeps only a
    block resident. A temporary file (``path=None``) is unlinked as soon as it is
    mapped: it disappears with the last reference to the tensor.
    """

    def __init__(self, mm: mmap.mmap, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
                 path: Path | None):
        np_dtype = _numpy_dtype(dtype)
        count = math.prod(shape)
        array = np.frombuffer(mm, dtype=np_dtype, count=count, offset=offset).reshape(shape)
        self._mm = mm
        self.path = path
        self.offset = offset
        self.shape = tuple(shape)
        self.tensor = torch.from_numpy(array)
        self.nbytes = count * np_dtype.itemsize

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: torch.dtype, path: str | os.PathLike | None = None,
               dir: str | os.PathLike | None = None) -> "MappedWeight":
        """A new zero-filled .npy of ``shape`` at ``path`` (or a temporary, unlinked file)."""
        np_dtype = _numpy_dtype(dtype)
        if path is None:
            folder = dir or os.environ.get("RECONVIZ_TMPDIR") or tempfile.gettempdir()
            fd, name = tempfile.mkstemp(prefix="reconviz-W-", suffix=".npy", dir=folder)
            f = os.fdopen(fd, "w+b")
            final = None
        else:
            final = Path(path)
            final.parent.mkdir(parents=True, exist_ok=True)
            f = open(final, "w+b")
            name = str(final)
        with f:
            header = {"descr": np.lib.format.dtype_to_descr(np_dtype), "fortran_order": False,
                      "shape": tuple(int(d) for d in shape)}
            _write_npy_header(f, header)
            offset = f.tell()
            nbytes = math.prod(shape) * np_dtype.itemsize
            f.truncate(offset + nbytes)  # sparse: no disk written until W is
            mm = mmap.mmap(f.fileno(), offset + nbytes) if offset + nbytes else mmap.mmap(-1, 1)
        if final is None:
            try:
                os.unlink(name)  # POSIX: the mapping keeps the data until it is closed
            except OSError:  # pragma: no cover - Windows: delete when the mapping goes
                weakref.finalize(mm, _unlink_quietly, name)
        return cls(mm, offset, tuple(shape), dtype, final)

    @classmethod
    def open(cls, path: str | os.PathLike, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
             writable: bool = False) -> "MappedWeight":
        """Map an existing array at ``offset`` of ``path``; read-only files map copy-on-write."""
        with open(path, "r+b" if writable else "rb") as f:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY
            mm = mmap.mmap(f.fileno(), 0, access=access)
        return cls(mm, offset, shape, dtype, Path(path) if writable else None)

    def release(self) -> None:
        """Drop this process's resident pages of the mapping (the data stay in the file)."""
        advise = getattr(self._mm, "madvise", None)
        if advise is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                advise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # pragma: no cover - closed or unsupported
                pass

    def flush(self) -> None:
        self._mm.flush()


def _write_npy_header(f, header: dict) -> None:
    """The .npy header numpy itself would write (version 1.0 unless it does not fit)."""
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # pragma: no cover - a header over 64 KiB
        np.lib.format.write_array_header_2_0(f, header)


def _unlink_quietly(name: str) -> None:  # pragma: no cover - Windows only
    try:
        os.unlink(name)
    except OSError:
        pass


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
    except TypeError as e:
        raise InputError(f"a {dtype} W cannot be streamed to a .npy file; use float64 or float32") from e


def class_blocks(n_probes: int, n_classes: int, per_class_bytes: int, mapped: bool) -> list[tuple[int, int]]:
    """Class ranges of at most BLOCK_BYTES (one range when W is in memory)."""
    if not mapped or n_classes == 0:
        return [(0, n_classes)]
    step = max(1, BLOCK_BYTES // max(1, n_probes * per_class_bytes))
    return [(k, min(n_classes, k + step)) for k in range(0, n_classes, step)]


@dataclass
class Reconstruction:
    """The exact affine model at N probes: ``logit_c(x) = <W[n, c], x> + b[n, c]``."""

    weight: Tensor  # (N, K, *sample_shape): class templates
    bias: Tensor  # (N, K)
    classes: Tensor  # (K,) indices of the reconstructed outputs
    logits: Tensor  # (N, K) original model outputs at the probes
    probes: Tensor  # (N, *sample_shape)
    meta: dict[str, Any] = field(default_factory=dict)
    mapped: MappedWeight | None = field(default=None, repr=False, compare=False)  # W on disk

    @property
    def streamed(self) -> bool:
        """True when ``weight`` lives in a memory-mapped file rather than in memory."""
        return self.mapped is not None

    def _blocks(self) -> list[tuple[int, int]]:
        per_class = math.prod(self.sample_shape) * self.weight.element_size()
        return class_blocks(self.n_probes, self.n_classes, per_class, self.streamed)

    def _release(self) -> None:
        if self.mapped is not None:
            self.mapped.release()

    # shapes ---------------------------------------------------------------
    @property
    def n_probes(self) -> int:
        return self.weight.shape[0]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def exactness(self) -> str:
        """``region-exact`` (valid on the probe's linear region) or ``point-exact``."""
        return self.meta.get("exactness", "region-exact")

    @property
    def tolerance(self) -> float:
        return float(self.meta.get("tolerance", tolerance_for(self.weight.dtype)))

    @property
    def predicted(self) -> Tensor:
        """Index into ``classes`` of the largest reconstructed logit, per probe (N,)."""
        return self.logits.argmax(dim=1)

    # the affine model -----------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        """W x + b for a batch of r * N inputs (input i uses probe i % N): (r * N, K)."""
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.sample_shape or x.shape[0] % self.n_probes:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"expected inputs of shape (r * {self.n_probes}, {', '.join(map(str, self.sample_shape))}), "
                f"got {shape}"
            )
        w = torch.as_tensor(self.weight).reshape(self.n_probes, self.n_classes, -1)
        xs = x.to(device=w.device, dtype=w.dtype).reshape(-1, self.n_probes, w.shape[-1])
        blocks = self._blocks()
        if len(blocks) == 1:
            return (torch.einsum("nkd,rnd->rnk", w, xs) + self.bias.to(w.device)).reshape(-1, self.n_classes)
        out = torch.empty(xs.shape[0], self.n_probes, self.n_classes, dtype=w.dtype)
        for k0, k1 in blocks:
            out[:, :, k0:k1] = torch.einsum("nkd,rnd->rnk", w[:, k0:k1], xs)
            self._release()
        return (out + self.bias.to(out.device)).reshape(-1, self.n_classes)

    def contributions(self) -> Tensor:
        """W * x0 per probe and class, (N, K, *sample_shape); sums with b to the logit.

        For a streamed W the result is streamed too (a temporary mapped file)."""
        x0 = self.probes.unsqueeze(1).to(device=self.weight.device, dtype=self.weight.dtype)
        if not self.streamed:
            return torch.as_tensor(self.weight) * x0
        out = MappedWeight.create(tuple(self.weight.shape), self.weight.dtype)
        for k0, k1 in self._blocks():
            torch.mul(self.weight[:, k0:k1], x0, out=out.tensor[:, k0:k1])
            self._release()
            out.release()
        return out.tensor

    def errors(self) -> tuple[float, float]:
        """(max abs, max rel) error of W x0 + b against the original logits."""
        rebuilt = self(self.probes)
        return (
            float((rebuilt - self.logits).abs().max()),
            float(relative_error(rebuilt, self.logits).max()),
        )

    def check(self) -> "Reconstruction":
        """Measure the error at the probes, store it in ``meta``; raise if above tolerance."""
        abs_err, rel_err = self.errors()
        self.meta.update(max_abs_error=abs_err, max_rel_error=rel_err)
        if not rel_err <= self.tolerance:
            raise ExactnessError(
                f"reconstruction misses the model at the probe: max relative error {rel_err:.3g} > "
                f"tolerance {self.tolerance:g} ({self.weight.dtype}). The frozen network is not "
                "affine: an op that depends on the input was not frozen. Use dtype=torch.float64 "
                "and report the model's ops if this persists"
            )
        return self

    def to_onnx(self, path: str | os.PathLike, **options: Any) -> Path:
        """Export the affine model as an ONNX graph (see :mod:`reconviz.onnx`)."""
        from .onnx import reconstruction_to_onnx

        return reconstruction_to_onnx(self, path, **options)

    # persistence ----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.npz) atomically; returns the path."""
        path = Path(path)
        meta = dict(self.meta, format=FORMAT, dtype=str(self.weight.dtype).replace("torch.", ""))
        meta.pop("weight_file", None)
        arrays = {
            "weight": _np(self.weight), "bias": _np(self.bias), "classes": _np(self.classes),
            "logits": _np(self.logits), "probes": _np(self.probes),
            "meta": np.array(json.dumps(meta, default=_jsonable)),
        }
        if self.streamed:  # write W block by block: never resident as a whole
            atomic_write(path, lambda f: _savez_blockwise(f, arrays, self._blocks(), self._release))
        else:
            atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
             mmap: bool = False) -> "Reconstruction":
        """Read a file written by :meth:`save` (never unpickles).

        ``mmap=True`` maps W from the file instead of reading it (copy-on-write,
        CPU only): for a W larger than memory. The other arrays are read."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False, mmap_mode=None) as z:
                names = set(z.files)
                data = {k: z[k] for k in z.files if not (mmap and k == "weight")}
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read reconstruction {path}: {e}") from e
        missing = {"weight", "bias", "classes", "logits", "probes", "meta"} - names
        if missing:
            raise InputError(f"{path} is not a reconviz reconstruction (missing {sorted(missing)})")
        meta = json.loads(str(data["meta"]))
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(map_location) for k, v in data.items() if k != "meta"}
        mapped = None
        if mmap:
            if torch.device(map_location).type != "cpu":
                raise InputError("mmap=True maps W on the CPU; use map_location='cpu'")
            mapped = _map_npz_member(path, "weight.npy")
            t["weight"] = mapped.tensor
        return cls(t["weight"], t["bias"], t["classes"], t["logits"], t["probes"], meta, mapped=mapped)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Reconstruction(probes={self.n_probes}, classes={self.n_classes}, sample_shape="
            f"{self.sample_shape}, dtype={self.weight.dtype}, method={m.get('method')}, "
            f"basis={m.get('basis')}, {self.exactness}, max_rel_error={m.get('max_rel_error', float('nan')):.2e})"
        )


def _savez_blockwise(f, arrays: dict[str, np.ndarray], blocks: list[tuple[int, int]], release) -> None:
    """np.savez's layout (an uncompressed zip of .npy members), W written a class block at a time."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, val in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as fid:
                if key != "weight":
                    np.lib.format.write_array(fid, np.asanyarray(val), allow_pickle=False)
                    continue
                _write_npy_header(fid, np.lib.format.header_data_from_array_1_0(val))
                for n in range(val.shape[0]):  # C order: probe-major, then classes
                    for k0, k1 in blocks:
                        fid.write(np.ascontiguousarray(val[n, k0:k1]).tobytes())
                        release()


def _map_npz_member(path: Path, member: str) -> MappedWeight:
    """Map an uncompressed .npy member of a .npz in place (np.savez stores without compression)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(f"{path}: {member} is compressed and cannot be memory-mapped")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise InputError(f"{path}: not a zip member header at {info.header_offset}")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        if fortran or dtype.hasobject:
            raise InputError(f"{path}: {member} cannot be memory-mapped")
        offset = f.tell()
    tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return MappedWeight.open(path, offset, tuple(shape), tdtype)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
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
