"""Loading what reconviz works on: model files, input files, saved reconstructions.

The command line (:mod:`reconviz.cli`) is a thin layer over this module, and it
is usable from Python the same way::

    from reconviz.io import load_inputs, load_model

    loaded = load_model("net.pt", arch="mynet:Net")       # a state_dict + its class
    x = load_inputs(["cat.png", "dog.png"], size=(32, 32), rgb=True)
    rec = reconviz.reconstruct(loaded.module, x)

Model files: a state_dict ``.pt`` (with ``arch``), a pickled ``nn.Module`` (only
with ``unsafe_pickle=True``: ``.pt`` files are read with ``weights_only=True``),
TorchScript, ONNX, and the bundled digits CNN (:func:`load_digits`). Input
files: images (anything Pillow reads) and ``.npy`` arrays. Every mistake raises
:class:`UsageError` with one line naming the file and what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ReconvizError

__all__ = ["UsageError", "LoadedModel", "Digits", "load_model", "load_digits", "load_inputs",
           "load_reconstruction", "load_class_names", "recorded_preprocessing", "int_list", "output_selector",
           "PREPROCESS_KEYS"]

PREPROCESS_KEYS = ("size", "grayscale", "rgb", "scale", "mean", "std", "npy_batch")
_KINDS = {"torch": "PyTorch model", "torchscript": "TorchScript model", "onnx": "ONNX model"}


class UsageError(ReconvizError):
    """A mistake of the caller (option, file, architecture): exit code 2, one line."""


# ---------------------------------------------------------------------------
# Models: state_dict + arch, pickled (opt-in), TorchScript, ONNX, the bundled digits CNN
# ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """What a model file turned out to be.

    ``kind``: ``"torch"`` (``module`` is an ``nn.Module``), ``"torchscript"``
    (``module`` is a ``torch.jit.ScriptModule``, run through its ONNX export) or
    ``"onnx"`` (the file is ``onnx_path``); ``source``: where it came from."""

    kind: str
    source: str
    module: Any = None
    onnx_path: Path | None = None

    @property
    def is_torch(self) -> bool:
        """True when ``module`` is an ``nn.Module`` reconviz reconstructs in PyTorch."""
        return self.kind == "torch"

    def describe(self) -> str:
        """``PyTorch model``, ``TorchScript model`` or ``ONNX model``."""
        return _KINDS[self.kind]

    def onnx_file(self, x: Any, workdir: str | Path | None = None) -> Path:
        """The ONNX file of an ONNX or TorchScript model. TorchScript is exported once (at
        ``x[:1]``, batch axis dynamic) to ``workdir/model.onnx`` (default: a new temporary folder)."""
        if self.onnx_path is not None:
            return self.onnx_path
        import torch

        from .onnx import export_torch

        path = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="reconviz-")) / "model.onnx"
        example = x[:1].detach().cpu().to(torch.float32).numpy()
        try:
            proto, _ = export_torch(self.module, example, ["logits"], strict=True)
        except Exception as e:  # noqa: BLE001
            raise UsageError(
                f"the TorchScript model could not be exported to ONNX ({one_line(e)[:200]}); TorchScript "
                "runs outside Python, so reconviz cannot intercept it directly: save model.state_dict() "
                "and pass it with --arch package.module:ClassName"
            ) from e
        path.write_bytes(proto.SerializeToString())
        self.onnx_path = path
        return path

    def logits(self, x: Any, output: Any = None, workdir: str | Path | None = None,
               tensor: str | None = None) -> Any:
        """f(x) flattened to (N, K_all) as float64 (float32 math for ONNX/TorchScript, where
        ``tensor`` may name the logits before a final Softmax)."""
        import numpy as np
        import torch

        if self.is_torch:
            from .probe import eval_copy
            from .verify import run_model

            work = eval_copy(self.module, torch.float64, x.device, track_paths=True)
            with torch.no_grad():
                return run_model(work, x.to(torch.float64), output)
        from .onnx import run_model as run_onnx

        out = run_onnx(self.onnx_file(x, workdir), x, tensor)
        return torch.from_numpy(np.asarray(out, dtype=np.float64))


def load_model(path: str | Path, *, arch: str | None = None, arch_kwargs: str | dict | None = None,
               unsafe_pickle: bool = False) -> LoadedModel:
    """Load a model file: ``.onnx``, TorchScript, a state_dict ``.pt`` with ``arch``
    (``package.module:Name`` or ``file.py:Name``, called with ``arch_kwargs``: a dict or
    a JSON object), or a pickled ``nn.Module`` (only with ``unsafe_pickle=True``)."""
    path = _existing_file(path, "model")
    if path.suffix.lower() == ".onnx":
        _no_arch(arch, arch_kwargs, "an ONNX file")
        return LoadedModel("onnx", str(path), onnx_path=path)
    if _is_torchscript(path):
        _no_arch(arch, arch_kwargs, "a TorchScript file")
        return LoadedModel("torchscript", str(path), module=_load_script(path))
    obj = _torch_load(path, unsafe_pickle)
    import torch.nn as nn

    if isinstance(obj, nn.Module):
        if arch:
            raise UsageError(f"{path} holds a whole pickled model, not a state_dict: drop --arch")
        return LoadedModel("torch", str(path), module=obj.eval())
    state = _state_dict(obj, path)
    if not arch:
        raise UsageError(
            f"{path} is a state_dict (weights only): name the architecture with "
            "--arch package.module:ClassName (and --arch-kwargs JSON if it takes arguments)"
        )
    model = _build_arch(arch, arch_kwargs)
    _load_state(model, state, path)
    return LoadedModel("torch", str(path), module=model.eval())


@dataclass
class Digits:
    """The bundled digits CNN and the first test digit of each class (``x``: (10, 1, 8, 8), float64)."""

    model: LoadedModel
    x: Any
    labels: list[int]
    class_names: list[str]


def load_digits() -> Digits:
    """The bundled digits CNN (:func:`reconviz.models.digits`) and one test digit per class."""
    import torch

    from .models import digits

    model, data = digits()
    y = torch.as_tensor(data.y_test)
    labels = sorted({int(c) for c in y.tolist()})
    picks = [int((y == c).nonzero()[0]) for c in labels]  # the first test digit of each class
    x = torch.as_tensor(data.x_test[picks], dtype=torch.float64)
    return Digits(LoadedModel("torch", "reconviz.models.digits()", module=model), x, labels, list(data.class_names))


def _no_arch(arch: Any, arch_kwargs: Any, what: str) -> None:
    if arch or arch_kwargs:
        raise UsageError(f"--arch/--arch-kwargs apply to state_dict files; MODEL is {what}")


def _existing_file(path_text: str | Path, what: str) -> Path:
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"{what} file not found: {path}")
    if not path.is_file():
        raise UsageError(f"{what} path is not a file: {path}")
    return path


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; torch.save archives have none."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _load_script(path: Path) -> Any:
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot load TorchScript file {path}: {one_line(e)}") from e


def _torch_load(path: Path, unsafe: bool) -> Any:
    """``torch.load(weights_only=True)``; a file that pickles Python objects only with ``unsafe``."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise UsageError(f"cannot read {path} as a PyTorch file: {one_line(e)}") from e
        if not unsafe:
            raise UsageError(
                f"{path} is not a weights-only file (it pickles Python objects, e.g. a whole model). "
                "Loading it can run arbitrary code: save model.state_dict() and use --arch, or pass "
                "--unsafe-pickle if you trust the file"
            ) from e
    _cwd_importable()  # a pickled model refers to its class by module name, as under `python`
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot unpickle {path}: {one_line(e)}") from e


def _state_dict(obj: Any, path: Path) -> dict:
    import torch

    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
        )

    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if is_state(obj.get(key)):
                return obj[key]
        keys = ", ".join(map(str, list(obj)[:8]))
        raise UsageError(f"{path} holds a dict that is not a state_dict (keys: {keys})")
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict or a model")


def _build_arch(spec: str, kwargs_json: str | dict | None) -> Any:
    import torch.nn as nn

    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"--arch must look like package.module:ClassName or file.py:ClassName, got {spec!r}")
    module = _import_target(target)
    try:
        factory = module
        for part in name.split("."):
            factory = getattr(factory, part)
    except AttributeError:
        raise UsageError(f"--arch: {target} has no attribute {name!r}") from None
    if not callable(factory):
        raise UsageError(f"--arch: {spec} is not a class or function")
    kwargs = _arch_kwargs(kwargs_json)
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UsageError(f"--arch: {spec}(**{kwargs}) failed: {one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _arch_kwargs(kwargs_json: str | dict | None) -> dict:
    if not kwargs_json:
        return {}
    kwargs = kwargs_json
    if isinstance(kwargs_json, str):
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise UsageError(f"--arch-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--arch-kwargs must be a JSON object, got {type(kwargs).__name__}")
    return kwargs


def _import_target(target: str) -> Any:
    if target.endswith(".py"):
        return _import_file(Path(target))
    _cwd_importable()
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise UsageError(f"--arch: no module named {e.name!r} (is it installed or in the working folder?)") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--arch: importing {target} failed: {type(e).__name__}: {one_line(e)}") from e


def _import_file(file: Path) -> Any:
    if not file.is_file():
        raise UsageError(f"--arch: file not found: {file}")
    name = f"_reconviz_arch_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UsageError(f"--arch: cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--arch: importing {file} failed: {type(e).__name__}: {one_line(e)}") from e
    return module


def _cwd_importable() -> None:
    """Like ``python -m``: modules in the working folder are importable."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _load_state(model: Any, state: dict, path: Path) -> None:
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = one_line(e).replace("Error(s) in loading state_dict for", "state_dict does not fit")
        raise UsageError(f"{path}: {msg[:400]}") from e


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------
# Inputs: images and .npy arrays
# ---------------------------------------------------------------------------


def load_inputs(paths: str | Path | Sequence[str | Path], *, size: Sequence[int] | None = None,
                grayscale: bool | None = None, rgb: bool | None = None, scale: float | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                npy_batch: bool | None = None) -> Any:
    """Read image and ``.npy`` files into one float64 batch (N, ...), preprocessed in this order:
    ``size`` (H, W: resize images), ``grayscale``/``rgb`` (images' channels), ``scale`` (default:
    images to [0, 1], arrays unchanged), ``mean``, ``std`` (one value or one per channel);
    ``npy_batch``: the first axis of every array is the batch axis (default: only 4-D arrays')."""
    import numpy as np
    import torch

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    pre = {"size": size, "grayscale": grayscale, "rgb": rgb, "scale": scale, "npy_batch": npy_batch}
    samples: list[np.ndarray] = []
    for text in paths:
        path = _existing_file(text, "input")
        if path.suffix.lower() == ".npy":
            samples.extend(_read_npy(path, pre))
        else:
            samples.append(_read_image(path, pre))
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        listed = ", ".join(f"{p}: {tuple(s.shape)}" for p, s in zip(paths, samples))
        raise UsageError(
            f"the inputs have different shapes ({listed[:300]}); use --size H W and --grayscale/--rgb "
            "to give images one shape"
        )
    x = _normalise(np.stack(samples).astype(np.float64), mean, std)
    return torch.from_numpy(np.ascontiguousarray(x))


def _normalise(x: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> Any:
    import numpy as np

    if mean is not None:
        x = x - _per_channel(mean, x, "--mean")
    if std is not None:
        s = _per_channel(std, x, "--std")
        if (s == 0).any():
            raise UsageError("--std must not contain 0")
        x = x / s
    if not np.isfinite(x).all():
        raise UsageError("the inputs contain NaN or Inf values")
    return x


def _per_channel(values: Sequence[float], x: Any, flag: str) -> Any:
    import numpy as np

    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if x.ndim < 3 and len(v) > 1:
        raise UsageError(f"{flag} gives {len(v)} values, but the inputs have no channel axis")
    channels = x.shape[1] if x.ndim >= 3 else 1
    if len(v) not in (1, channels):
        raise UsageError(f"{flag} gives {len(v)} values; the inputs have {channels} channel(s)")
    return v.reshape((1, -1) + (1,) * (x.ndim - 2)) if x.ndim >= 3 else v


def _read_npy(path: Path, pre: dict) -> list:
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot read {path} as a .npy array: {one_line(e)}") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise UsageError(f"{path} must hold a numeric array, got dtype {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim == 0:
        raise UsageError(f"{path} holds a scalar, not a sample")
    arr = arr.astype(np.float64) * (pre.get("scale") or 1.0)
    if pre.get("npy_batch") or arr.ndim == 4:
        if arr.shape[0] == 0:
            raise UsageError(f"{path} holds an empty batch")
        return list(arr)
    if arr.ndim == 2:  # one one-channel image (H, W)
        arr = arr[None]
    return [arr]


_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def _read_image(path: Path, pre: dict) -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if pre.get("grayscale"):
                target = "L"
            elif pre.get("rgb"):
                target = "RGB"
            else:
                target = "L" if mode in ("1", "L", "LA", *_INT_MODES) else "RGB"
            if mode in _INT_MODES and target == "L":
                img = img.convert("F") if mode != "F" else img
                full = 1.0 if mode == "F" else 65535.0
            else:
                img = img.convert(target)
                full = 255.0
            if pre.get("size"):
                h, w = pre["size"]
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float64)
    except UnidentifiedImageError:
        raise UsageError(f"{path} is not an image file Pillow can read (use .npy for arrays)") from None
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {one_line(e)}") from e
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr * (pre["scale"] if pre.get("scale") is not None else 1.0 / full)


# ---------------------------------------------------------------------------
# Saved reconstructions and class names
# ---------------------------------------------------------------------------


def load_reconstruction(path_text: str | Path) -> Any:
    """Reconstruction.load (an InputError names the file and what is wrong with it)."""
    from .reconstruction import Reconstruction

    return Reconstruction.load(_existing_file(path_text, "reconstruction"))


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _size(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and _finite(n) and n >= 1 for n in v)


def _values(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(map(_finite, v))


_RECORDED: dict[str, Callable[[Any], bool]] = {  # preprocessing option -> test of its recorded value
    "size": _size, "grayscale": _flag, "rgb": _flag, "npy_batch": _flag,
    "scale": lambda v: _finite(v) and v != 0, "mean": _values, "std": _values,
}


def recorded_preprocessing(rec: Any, path: str | Path) -> dict:
    """The preprocessing 'reconviz reconstruct' recorded in ``rec`` (UsageError when it is not valid)."""
    pre = (rec.meta.get("cli") or {}).get("preprocess") or {}
    bad = [k for k, ok in _RECORDED.items() if k in pre and not ok(pre[k])] if isinstance(pre, dict) else ["all"]
    if bad:
        raise UsageError(f"{path}: the recorded preprocessing is not valid ({', '.join(bad)}); re-create the "
                         "reconstruction with 'reconviz reconstruct'")
    return pre


def load_class_names(text: str | None) -> list[str] | None:
    """Class names: a text file with one name per line, or comma-separated names (None: None)."""
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in text.split(",")]
    if not names or not all(names):
        raise UsageError(f"--class-names: expected comma-separated names or a file, got {text!r}")
    return names


def int_list(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated integers (None, "" or "all": None); UsageError naming ``flag`` otherwise."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def output_selector(text: str | None) -> Any:
    """--output: an index (digits, optionally negative) or a key."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text
