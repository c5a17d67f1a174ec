"""Stage 4 — the result: the affine model f(x) = W x + b at each probe.

A :class:`Reconstruction` is plain data: ``weight`` (N, K, *sample_shape),
``bias`` (N, K), the reconstructed ``classes``, the original ``logits`` at the
probes and the ``probes`` themselves, plus metadata (method, basis, dtype,
tolerance, measured errors). The core facts are typed read-only properties:
``exactness``, ``tolerance``, ``method``, ``self_checks`` and ``frozen`` (what
the probe froze, as :class:`FrozenOp` records). It saves to ``.npz`` atomically
and loads without executing code (``allow_pickle=False``). A fresh result also
keeps the linearized model it was solved on (``linearized``; not saved), which
:func:`reconviz.verify` reuses instead of probing the model again.

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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from .errors import ExactnessError, InputError
from .files import atomic_write, read_npz
from .selfcheck import SelfCheck, relative_error

if TYPE_CHECKING:
    from .linearize import LinearizedModel

__all__ = ["Reconstruction", "FrozenOp", "MappedWeight", "tolerance_for", "atomic_write"]

FORMAT = "reconviz.reconstruction/1"
BLOCK_BYTES = 64 * 2**20  # bytes of a mapped W touched at once before its pages are handed back


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance of the exactness contract: |Wx+b - f(x)| <= tol * max(1, |f(x)|)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


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


@dataclass(frozen=True)
class FrozenOp:
    """What the probe froze at one place of the network: ``count`` gated calls of ``op``
    (e.g. ``relu``, ``max_pool2d``; ONNX: the op type, ``Relu``) at ``location`` (the
    module path on the PyTorch path, ``""`` for the top module; the node name on the
    ONNX path), frozen by the gate ``gate`` (a name from :func:`reconviz.registered_gates`)."""

    op: str
    location: str
    gate: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "location": self.location, "gate": self.gate, "count": self.count}


def frozen_summary(priors: Any) -> list[FrozenOp]:
    """One :class:`FrozenOp` per (gate, op, location) of ``priors``, in order of first call.

    A prior has ``gate`` and ``op``, and ``module_path`` (PyTorch) or ``node`` (ONNX);
    a PyTorch prior with ``constant`` set (a gate on a tensor that does not depend on
    the input) is replayed as written, not frozen, and is left out."""
    counts: dict[tuple[str, str, str], int] = {}
    for p in priors:
        if getattr(p, "constant", False):
            continue
        location = getattr(p, "module_path", None)
        key = (str(p.gate), str(p.op), str(location if location is not None else getattr(p, "node", "")))
        counts[key] = counts.get(key, 0) + 1
    return [FrozenOp(op, location, gate, n) for (gate, op, location), n in counts.items()]


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
    # the linearized network the solve ran on (PyTorch path; never saved, None after load):
    # verify reuses it for the certified radius instead of probing the model again
    linearized: LinearizedModel | None = field(default=None, repr=False, compare=False)
    # the model's inputs when ``probes`` are a layer's activations (``meta["layer"]``, a
    # reconstruction from that layer to the logits: :mod:`reconviz.layer`); None otherwise
    inputs: Tensor | None = field(default=None, repr=False, compare=False)

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
        """Relative tolerance of the exactness contract (``meta["tolerance"]``, else the dtype's)."""
        return float(self.meta.get("tolerance", tolerance_for(self.weight.dtype)))

    @property
    def method(self) -> str | None:
        """The solve that computed W: ``"basis"`` or ``"adjoint"`` (None when not recorded)."""
        method = self.meta.get("method")
        return None if method is None else str(method)

    @property
    def frozen(self) -> list[FrozenOp] | None:
        """What the probe froze, per (gate, op, module path or ONNX node): a list of
        :class:`FrozenOp` (``meta["frozen"]``; None when not recorded, e.g. a file saved
        by an older reconviz). InputError when malformed. ``meta["gates"]`` keeps the
        older untyped counts (gate names on the PyTorch path, op types on the ONNX path)."""
        records = self.meta.get("frozen")
        if records is None:
            return None
        if not isinstance(records, list):
            raise InputError(f"meta['frozen'] must be a list of frozen-op records, got {type(records).__name__}")
        return [_frozen_op(d) for d in records]

    @property
    def predicted(self) -> Tensor:
        """Index into ``classes`` of the largest reconstructed logit, per probe (N,)."""
        return self.logits.argmax(dim=1)

    @property
    def self_checks(self) -> list[SelfCheck]:
        """The solver's self-checks (``meta["self_checks"]``); InputError when malformed."""
        checks = self.meta.get("self_checks") or []
        if not isinstance(checks, list):
            raise InputError(f"meta['self_checks'] must be a list of self-check records, got {type(checks).__name__}")
        return [_self_check(d) for d in checks]

    # the affine model -----------------------------------------------------
    def check_input(self, x: Any) -> Tensor:
        """``x`` if it is a batch of r * N samples of the probes' shape; InputError otherwise."""
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.sample_shape or x.shape[0] % self.n_probes:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"expected inputs of shape (r * {self.n_probes}, {', '.join(map(str, self.sample_shape))}), "
                f"got {shape}: input i is compared through probe i % {self.n_probes}'s linear model"
            )
        return x

    def __call__(self, x: Tensor) -> Tensor:
        """W x + b for a batch of r * N inputs (input i uses probe i % N): (r * N, K)."""
        x = self.check_input(x)
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
        """Export the affine model as an ONNX graph (see :func:`reconviz.export.reconstruction_to_onnx`)."""
        from .export import reconstruction_to_onnx

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
        if self.inputs is not None:
            arrays["inputs"] = _np(self.inputs)
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
        CPU only): for a W larger than memory. The other arrays are read. A file
        that is not such a reconstruction (not a zip, members missing, metadata or
        arrays that do not fit together) is an InputError naming it and the problem."""
        path = Path(path)
        device = _device(map_location, mmap)
        arrays = _read_members(path, skip=("weight",) if mmap else ())
        meta = _read_meta(path, arrays.pop("meta"))
        mapped = _map_npz_member(path, "weight.npy") if mmap else None
        if mapped is not None:
            arrays["weight"] = mapped.tensor.numpy()
        _check_arrays(path, arrays)
        if meta.get("layer") is not None and "inputs" not in arrays:
            raise _bad_file(path, f"its metadata names layer {meta['layer']!r} but the inputs member (the "
                            "model inputs behind the activations) is missing")
        arrays["classes"] = arrays["classes"].astype(np.int64)
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
        if mapped is not None:
            t["weight"] = mapped.tensor
        return cls(t["weight"], t["bias"], t["classes"], t["logits"], t["probes"], meta, mapped=mapped,
                   inputs=t.get("inputs"))

    def _repr_html_(self) -> str:
        """Notebooks: the key facts and the first probe's top-class template."""
        from .htmlparts import reconstruction_html

        return reconstruction_html(self)

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


_MEMBERS = ("weight", "bias", "classes", "logits", "probes", "meta")
_OPTIONAL = ("inputs",)  # a layer's reconstruction: the model inputs behind its activations


def _bad_file(path: Path, what: str) -> InputError:
    return InputError(f"{path} is not a reconviz reconstruction as Reconstruction.save writes it: {what}. "
                      "Re-create it with Reconstruction.save (or 'reconviz reconstruct')")


def _device(map_location: Any, mmap: bool) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"map_location={map_location!r} is not a device: use 'cpu', 'cuda', ...") from e
    if mmap and device.type != "cpu":
        raise InputError("mmap=True maps W on the CPU; use map_location='cpu'")
    return device


def _read_members(path: Path, skip: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of a .npz (no unpickling); InputError for anything but a complete reconstruction."""
    wanted = [k for k in _MEMBERS + _OPTIONAL if k not in skip]
    return read_npz(path, "reconstruction", _bad_file, _MEMBERS, wanted)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or ok(v)


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, kind)


# metadata keys reconviz reads back: key -> (test, what it must be)
_META_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "tolerance": (lambda v: _number(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "max_abs_error": (_number, "a number"),
    "max_rel_error": (_number, "a number"),
    "exactness": (lambda v: v in ("region-exact", "point-exact"), "'region-exact' or 'point-exact'"),
    "output": (lambda v: v is None or isinstance(v, str) or (_number(v) and isinstance(v, int)),
               "an output index, a key or null"),
    "notes": (_is(list), "a list"),
    "class_names": (_optional(lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
                    "a list of strings"),
    "cli": (_optional(_is(dict)), "an object"),
    "self_checks": (_optional(_is(list)), "a list"),
    "frozen": (_optional(_is(list)), "a list"),
    **{k: (_optional(_is(str)), "a string")
       for k in ("method", "basis", "model", "logits_tensor", "input_name", "linearization", "layer")},
}


_SELF_CHECK_FIELDS: dict[str, Callable[[Any], bool]] = {
    "name": _is(str), "passed": _optional(_is(bool)), "max_rel_error": _optional(_number),
    "tolerance": _number, "detail": _is(str),
}


def _self_check(d: Any) -> SelfCheck:
    """A SelfCheck from its stored record; InputError when a field is missing or mistyped."""
    bad = [k for k, ok in _SELF_CHECK_FIELDS.items() if not (isinstance(d, dict) and k in d and ok(d[k]))]
    if not bad and d["passed"] is not None and d["max_rel_error"] is None:
        bad = ["max_rel_error"]  # a check that ran has a measured error
    if bad:
        raise InputError(f"self-check record {d!r:.80} has missing or mistyped field(s) {', '.join(bad)}: "
                         "expected name (str), passed (bool or null), max_rel_error (number, null only when "
                         "skipped), tolerance (number), detail (str)")
    return SelfCheck.from_dict(d)


_FROZEN_FIELDS: dict[str, Callable[[Any], bool]] = {
    "op": _is(str), "location": _is(str), "gate": _is(str),
    "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


def _frozen_op(d: Any) -> FrozenOp:
    """A FrozenOp from its stored record; InputError when a field is missing or mistyped."""
    bad = [k for k, ok in _FROZEN_FIELDS.items() if not (isinstance(d, dict) and k in d and ok(d[k]))]
    if bad:
        raise InputError(f"frozen-op record {d!r:.80} has missing or mistyped field(s) {', '.join(bad)}: "
                         "expected op (str), location (str), gate (str), count (int >= 1)")
    return FrozenOp(d["op"], d["location"], d["gate"], d["count"])


def _read_meta(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """The JSON metadata member, with the types of the keys reconviz reads checked."""
    if arr.ndim != 0 or arr.dtype.kind != "U":
        raise _bad_file(path, f"its metadata is a {arr.dtype} array of shape {arr.shape}, not a JSON string")
    try:
        meta = json.loads(str(arr))
    except ValueError as e:  # json.JSONDecodeError
        raise _bad_file(path, f"its metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _bad_file(path, f"its metadata is a JSON {type(meta).__name__}, not an object")
    for key, (ok, what) in _META_TYPES.items():
        if key in meta and not ok(meta[key]):
            raise _bad_file(path, f"metadata {key!r} must be {what}, got {meta[key]!r:.60}")
    for record in meta.get("self_checks") or []:
        try:
            _self_check(record)
        except InputError as e:
            raise _bad_file(path, str(e)) from None
    for record in meta.get("frozen") or []:
        try:
            _frozen_op(record)
        except InputError as e:
            raise _bad_file(path, str(e)) from None
    return meta


def _check_arrays(path: Path, a: dict[str, np.ndarray]) -> None:
    """dtypes and shapes: W (N, K, *S) float, b and logits (N, K), classes (K,) distinct indices, probes (N, *S)."""
    for name in ("weight", "bias", "logits", "probes"):
        if a[name].dtype not in (np.float16, np.float32, np.float64):
            raise _bad_file(path, f"{name} has dtype {a[name].dtype}; expected float64, float32 or float16")
    w = a["weight"]
    if w.ndim < 3 or 0 in w.shape:
        raise _bad_file(path, f"weight has shape {w.shape}; expected (probes, classes, *sample_shape), none empty")
    n, k, sample = w.shape[0], w.shape[1], w.shape[2:]
    for name, shape in (("bias", (n, k)), ("classes", (k,)), ("logits", (n, k)), ("probes", (n, *sample))):
        if a[name].shape != shape:
            raise _bad_file(path, f"{name} has shape {a[name].shape}, but weight {w.shape} needs {shape}")
    if "inputs" in a and (a["inputs"].dtype not in (np.float16, np.float32, np.float64)
                          or a["inputs"].ndim < 2 or a["inputs"].shape[0] != n):
        raise _bad_file(path, f"inputs has dtype {a['inputs'].dtype} and shape {a['inputs'].shape}; expected "
                        f"floats with a leading batch of {n} (the model inputs behind the probes)")
    c = a["classes"]
    if c.dtype.kind not in "iu":
        raise _bad_file(path, f"classes has dtype {c.dtype}; expected integer indices")
    if (c < 0).any() or (c > np.iinfo(np.int64).max).any() or len(np.unique(c)) != k:
        raise _bad_file(path, f"classes {c.tolist()[:8]} are not distinct indices >= 0")


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
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
        except ValueError as e:
            raise _bad_file(path, f"{member} has no valid .npy header ({e})") from e
        if fortran or dtype not in (np.float16, np.float32, np.float64):
            raise _bad_file(path, f"{member} ({dtype}, {'Fortran' if fortran else 'C'} order) cannot be "
                                  "memory-mapped: it must be a C-ordered float array")
        offset = f.tell()
    tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    try:
        return MappedWeight.open(path, offset, tuple(shape), tdtype)
    except ValueError as e:  # the member is shorter than its header says
        raise _bad_file(path, f"{member} is truncated ({e})") from e


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)
