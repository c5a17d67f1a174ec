"""The ``reconviz`` command line: ``demo``, ``reconstruct``, ``verify``, ``show``.

Exit codes: 0 the reconstruction verified (PASS), 1 it did not (FAIL, including
an :class:`~reconviz.errors.ExactnessError`), 2 a usage or input mistake (bad
option, missing or unreadable file, bad ``--arch``, any other
:class:`~reconviz.errors.ReconvizError`), 3 an unexpected internal error. Errors
are one line on stderr, ``reconviz: error: ...``; ``--debug`` shows the traceback.

See docs/cli.md for every option.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ReconvizError

__all__ = ["main", "UsageError"]

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
REC_NAME = "reconstruction.npz"
MAX_FIGURE_PROBES = 16


class UsageError(ReconvizError):
    """A mistake of the caller (option, file, architecture): exit code 2, one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (through :func:`main`) instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------


def _scale(text: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 1/255, got {text!r}")
    if not math.isfinite(value) or value == 0:
        raise argparse.ArgumentTypeError(f"scale must be finite and non-zero, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    try:
        values = [float(Fraction(v.strip())) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")

    parser = _Parser(
        prog="reconviz",
        description="Exact model reconstruction f(x) = W x + b of piecewise-linear PyTorch "
                    "classifiers: reconstruct, verify, and plot the class templates.",
        epilog="Exit codes: 0 PASS, 1 verification FAIL, 2 usage or input error, 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"reconviz {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # demo -------------------------------------------------------------------
    p = sub.add_parser("demo", parents=[debug], help="reconstruct the bundled digits model and plot it",
                       description="Reconstruct the bundled 8x8 digits CNN at the first test digit of "
                                   "each class, verify it (the paper's Table 1 view), and write the "
                                   "class templates, contribution maps and a gradient saliency figure.")
    p.add_argument("--out", default="reconviz-demo", metavar="DIR", help="output folder (default: reconviz-demo/)")
    p.set_defaults(func=cmd_demo)

    # model + input options shared by reconstruct and verify ------------------
    model_opts = _Parser(add_help=False)
    g = model_opts.add_argument_group("model")
    g.add_argument("--arch", metavar="MODULE:NAME",
                   help="class (or factory) to build the model for a state_dict .pt file: "
                        "package.module:ClassName or path/to/file.py:ClassName")
    g.add_argument("--arch-kwargs", metavar="JSON", default=None,
                   help='keyword arguments for --arch as a JSON object, e.g. \'{"num_classes": 10}\'')
    g.add_argument("--unsafe-pickle", action="store_true",
                   help="allow a .pt file that is not weights-only (a pickled model or checkpoint). "
                        "Unpickling can run arbitrary code: only for files you trust")
    g.add_argument("--output", metavar="INDEX|KEY", default=None,
                   help="select the logits when the model returns a tuple or dict")
    g.add_argument("--class-names", metavar="NAMES", default=None,
                   help="comma-separated class names, or a text file with one name per line")

    input_opts = _Parser(add_help=False)
    g = input_opts.add_argument_group("input preprocessing (applied in this order)")
    g.add_argument("--size", nargs=2, type=_positive_int, metavar=("H", "W"),
                   help="resize images to H x W (bilinear); .npy arrays are never resized")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--grayscale", action="store_true", default=None,
                      help="read images as one channel (default: grayscale images 1, colour images 3)")
    mode.add_argument("--rgb", action="store_true", default=None, help="read images as three channels")
    g.add_argument("--scale", type=_scale, default=None, metavar="S",
                   help="multiply by S, e.g. 1/255 (default: images map their integer range to [0, 1]; "
                        ".npy arrays are left as they are)")
    g.add_argument("--mean", type=_floats, default=None, metavar="M[,M...]",
                   help="subtract the per-channel mean (one value, or one per channel)")
    g.add_argument("--std", type=_floats, default=None, metavar="S[,S...]",
                   help="divide by the per-channel std (one value, or one per channel)")
    g.add_argument("--npy-batch", action="store_true", default=None,
                   help="the first axis of every .npy array is the batch axis (default: only 4-D arrays)")

    # reconstruct ------------------------------------------------------------
    p = sub.add_parser(
        "reconstruct", parents=[debug, model_opts, input_opts],
        help="reconstruct W and b of a model at input files, verify, and plot",
        description="Reconstruct the exact affine model f(x) = W x + b of MODEL at the INPUT files, "
                    "verify it, and write reconstruction.npz, report.txt, report.json and figures "
                    "into --out. MODEL is a TorchScript file, an ONNX file, or a state_dict .pt "
                    "with --arch.",
    )
    p.add_argument("model", metavar="MODEL", help="TorchScript .pt, ONNX .onnx, or state_dict .pt (with --arch)")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files (PNG, JPEG, ...) or .npy arrays")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g = p.add_argument_group("reconstruction")
    g.add_argument("--classes", default=None, metavar="LIST|top-K",
                   help="classes to reconstruct: comma-separated indices, top-K (the K largest logits "
                        "of each probe), or all (default)")
    g.add_argument("--method", choices=["auto", "basis", "adjoint"], default="auto",
                   help="basis: the paper's orthogonal-basis solve; adjoint: one backward pass per "
                        "class; auto: the cheaper (default)")
    g.add_argument("--basis", choices=["identity", "hadamard", "random"], default="identity",
                   help="orthonormal basis of the basis solve (default: identity, one by one)")
    g.add_argument("--dtype", choices=["float64", "float32"], default=None,
                   help="working precision (default float64; ONNX models run in float32)")
    g.add_argument("--chunk-size", type=_positive_int, default=None, metavar="M",
                   help="basis columns per forward pass / classes per backward pass")
    g.add_argument("--seed", type=int, default=0, help="seed of the random basis (default 0)")
    g.add_argument("--backend", choices=["torch", "onnxruntime", "both"], default="torch",
                   help="verify in PyTorch (default), onnxruntime, or both (torch models)")
    g.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=cmd_reconstruct)

    # verify -----------------------------------------------------------------
    p = sub.add_parser(
        "verify", parents=[debug, model_opts, input_opts],
        help="re-verify a saved reconstruction against its model",
        description="Load REC.npz and compare W x + b with MODEL at the INPUT files (default: the "
                    "stored probes). Preprocessing options default to those recorded by "
                    "'reconviz reconstruct'. The inputs must be r x N samples: input i is compared "
                    "through probe i mod N's linear model.",
    )
    p.add_argument("rec", metavar="REC.npz", help="a reconstruction written by 'reconviz reconstruct'")
    p.add_argument("model", metavar="MODEL", help="the model (as for 'reconviz reconstruct')")
    p.add_argument("inputs", metavar="INPUT", nargs="*", help="inputs to compare at (default: the probes)")
    p.add_argument("--tolerance", type=float, default=None, metavar="REL",
                   help="relative tolerance (default: 1e-9 for float64, 1e-4 for float32)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "both"], default="torch",
                   help="verify in PyTorch (default), onnxruntime, or both (torch models)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write report.txt and report.json here")
    p.set_defaults(func=cmd_verify)

    # show -------------------------------------------------------------------
    p = sub.add_parser("show", parents=[debug], help="plot a saved reconstruction",
                       description="Write the class templates and contribution maps of a saved "
                                   "reconstruction as PNG files.")
    p.add_argument("rec", metavar="REC.npz", help="a reconstruction written by 'reconviz reconstruct'")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the folder of REC.npz)")
    p.add_argument("--probe", type=int, nargs="+", default=None, metavar="N",
                   help=f"probes to plot (default: the first {MAX_FIGURE_PROBES})")
    p.add_argument("--class-names", metavar="NAMES", default=None,
                   help="comma-separated class names, or a text file with one name per line")
    p.set_defaults(func=cmd_show)
    return parser


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 PASS, 1 FAIL, 2 usage error, 3 internal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args))
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        _fail("interrupted", debug)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        code, message = _classify(e)
        _fail(message, debug)
        return code


def _classify(e: BaseException) -> tuple[int, str]:
    from .errors import ExactnessError

    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ExactnessError):
        return EXIT_FAIL, text
    if isinstance(e, ReconvizError):  # UsageError included
        return EXIT_USAGE, text
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return EXIT_USAGE, f"{e.strerror or type(e).__name__}: {e.filename}"
    if isinstance(e, (OSError, ValueError)):
        return EXIT_USAGE, f"{type(e).__name__}: {text}"
    return EXIT_INTERNAL, f"internal error ({type(e).__name__}: {text}); rerun with --debug and report it"


def _fail(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"reconviz: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Models: TorchScript, ONNX, state_dict + --arch, pickled (opt-in)
# ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """What MODEL turned out to be. ``module`` for PyTorch, ``onnx_path`` for ONNX/TorchScript."""

    kind: str  # "torch", "torchscript" or "onnx"
    source: str
    module: Any = None  # nn.Module (torch) or torch.jit.ScriptModule (torchscript)
    onnx_path: Path | None = None

    def describe(self) -> str:
        return {"torch": "PyTorch model", "torchscript": "TorchScript model", "onnx": "ONNX model"}[self.kind]


def load_model(path_text: str, args: argparse.Namespace) -> LoadedModel:
    path = _existing_file(path_text, "model")
    if path.suffix.lower() == ".onnx":
        _no_arch(args, "an ONNX file")
        return LoadedModel("onnx", str(path), onnx_path=path)
    if _is_torchscript(path):
        _no_arch(args, "a TorchScript file")
        import torch

        try:
            script = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot load TorchScript file {path}: {_one_line(e)}") from e
        return LoadedModel("torchscript", str(path), module=script.eval())
    obj = _torch_load(path, args.unsafe_pickle)
    import torch.nn as nn

    if isinstance(obj, nn.Module):
        if args.arch:
            raise UsageError(f"{path} holds a whole pickled model, not a state_dict: drop --arch")
        return LoadedModel("torch", str(path), module=obj.eval())
    state = _state_dict(obj, path)
    if not args.arch:
        raise UsageError(
            f"{path} is a state_dict (weights only): name the architecture with "
            "--arch package.module:ClassName (and --arch-kwargs JSON if it takes arguments)"
        )
    model = _build_arch(args.arch, args.arch_kwargs)
    _load_state(model, state, path)
    return LoadedModel("torch", str(path), module=model.eval())


def _no_arch(args: argparse.Namespace, what: str) -> None:
    if getattr(args, "arch", None) or getattr(args, "arch_kwargs", None):
        raise UsageError(f"--arch/--arch-kwargs apply to state_dict files; MODEL is {what}")


def _existing_file(path_text: str, what: str) -> Path:
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


def _torch_load(path: Path, unsafe: bool) -> Any:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise UsageError(f"cannot read {path} as a PyTorch file: {_one_line(e)}") from e
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
            raise UsageError(f"cannot unpickle {path}: {_one_line(e)}") from e


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


def _build_arch(spec: str, kwargs_json: str | None) -> Any:
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
    kwargs: dict = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise UsageError(f"--arch-kwargs is not valid JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--arch-kwargs must be a JSON object, got {type(kwargs).__name__}")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UsageError(f"--arch: {spec}(**{kwargs}) failed: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_target(target: str) -> Any:
    if target.endswith(".py"):
        file = Path(target)
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
            raise UsageError(f"--arch: importing {file} failed: {type(e).__name__}: {_one_line(e)}") from e
        return module
    _cwd_importable()
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise UsageError(f"--arch: no module named {e.name!r} (is it installed or in the working folder?)") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--arch: importing {target} failed: {type(e).__name__}: {_one_line(e)}") from e


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
        msg = _one_line(e).replace("Error(s) in loading state_dict for", "state_dict does not fit")
        raise UsageError(f"{path}: {msg[:400]}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------
# Inputs: images and .npy arrays
# ---------------------------------------------------------------------------

_PREPROCESS_KEYS = ("size", "grayscale", "rgb", "scale", "mean", "std", "npy_batch")


def preprocessing(args: argparse.Namespace, recorded: dict | None = None) -> dict:
    """The preprocessing options given on the command line, else those recorded, else defaults."""
    recorded = recorded or {}
    return {k: getattr(args, k) if getattr(args, k, None) is not None else recorded.get(k) for k in _PREPROCESS_KEYS}


def load_inputs(paths: Sequence[str], pre: dict) -> "Any":
    """Read and preprocess the inputs into one float64 batch (N, ...)."""
    import numpy as np
    import torch

    samples: list[np.ndarray] = []
    for text in paths:
        path = _existing_file(text, "input")
        if path.suffix.lower() == ".npy":
            arr = _read_npy(path, pre)
            samples.extend(arr)
        else:
            samples.append(_read_image(path, pre))
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        listed = ", ".join(f"{p}: {tuple(s.shape)}" for p, s in zip(paths, samples))
        raise UsageError(
            f"the inputs have different shapes ({listed[:300]}); use --size H W and --grayscale/--rgb "
            "to give images one shape"
        )
    x = np.stack(samples).astype(np.float64)
    if pre.get("mean") is not None:
        x = x - _per_channel(pre["mean"], x, "--mean")
    if pre.get("std") is not None:
        std = _per_channel(pre["std"], x, "--std")
        if (std == 0).any():
            raise UsageError("--std must not contain 0")
        x = x / std
    if not np.isfinite(x).all():
        raise UsageError("the inputs contain NaN or Inf values")
    return torch.from_numpy(np.ascontiguousarray(x))


def _per_channel(values: list[float], x: Any, flag: str) -> Any:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
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
        raise UsageError(f"cannot read {path} as a .npy array: {_one_line(e)}") from e
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
                target = "L" if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else "RGB"
            if mode in ("I", "I;16", "I;16B", "I;16L", "F") and target == "L":
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
        raise UsageError(f"cannot read image {path}: {_one_line(e)}") from e
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr * (pre["scale"] if pre.get("scale") is not None else 1.0 / full)


def parse_classes(text: str | None, logits: Callable[[], Any]) -> list[int] | None:
    """``None``/``all`` -> all; ``3,5`` -> [3, 5]; ``top-K`` -> union of each probe's K largest logits."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    t = text.strip().lower()
    if t.startswith("top-") or t.startswith("top"):
        k_text = t[4:] if t.startswith("top-") else t[3:]
        try:
            k = int(k_text)
        except ValueError:
            raise UsageError(f"--classes: expected top-K with K a positive integer, got {text!r}") from None
        if k < 1:
            raise UsageError(f"--classes: K in top-K must be at least 1, got {text!r}")
        out = logits()  # (N, K_all) float tensor
        k = min(k, out.shape[1])
        top = out.topk(k, dim=1).indices
        order = out.max(dim=0).values  # the union, largest logit first
        chosen = sorted({int(c) for c in top.reshape(-1)}, key=lambda c: -float(order[c]))
        return chosen
    try:
        return [int(c) for c in t.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes: expected comma-separated indices, top-K or all, got {text!r}") from None


def parse_class_names(text: str | None) -> list[str] | None:
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


def _output_selector(text: str | None) -> Any:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


# ---------------------------------------------------------------------------
# Running a loaded model: reconstruct, forward, verify
# ---------------------------------------------------------------------------


def _onnx_file(loaded: LoadedModel, x: Any, workdir: Path) -> Path:
    """The ONNX file of an ONNX or TorchScript model (TorchScript is exported once, batch axis dynamic)."""
    if loaded.onnx_path is not None:
        return loaded.onnx_path
    import torch

    from .onnx import export_torch

    path = workdir / "model.onnx"
    example = x[:1].detach().cpu().to(torch.float32).numpy()
    try:
        proto, _ = export_torch(loaded.module, example, ["logits"], strict=True)
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            f"the TorchScript model could not be exported to ONNX ({_one_line(e)[:200]}); TorchScript "
            "runs outside Python, so reconviz cannot intercept it directly: save model.state_dict() "
            "and pass it with --arch package.module:ClassName"
        ) from e
    path.write_bytes(proto.SerializeToString())
    loaded.onnx_path = path
    return path


def _onnx_forward(path: Path, x: Any, tensor: str | None = None) -> Any:
    """The ONNX model's first output (or the tensor ``tensor``, e.g. the logits before a
    final Softmax that reconviz.onnx reconstructs) at x, as float64 (N, K)."""
    import numpy as np
    import torch

    from .onnx import run_model

    out = run_model(path, x, tensor)
    return torch.from_numpy(np.asarray(out, dtype=np.float64))


def model_logits(loaded: LoadedModel, x: Any, output: Any, workdir: Path, tensor: str | None = None) -> Any:
    """f(x) flattened to (N, K_all), in float64 (float32 math for ONNX/TorchScript)."""
    import torch

    if loaded.kind == "torch":
        from .probe import working_copy
        from .verify import run_model

        work = working_copy(loaded.module, torch.float64, x.device)
        with torch.no_grad():
            return run_model(work, x.to(torch.float64), output)
    return _onnx_forward(_onnx_file(loaded, x, workdir), x, tensor)


def _reconstruct(loaded: LoadedModel, x: Any, args: argparse.Namespace, classes: Any, workdir: Path) -> Any:
    import torch

    from . import reconstruct

    if loaded.kind == "torch":
        dtype = torch.float32 if args.dtype == "float32" else torch.float64
        return reconstruct(loaded.module, x, classes=classes, method=args.method, basis=args.basis,
                           dtype=dtype, chunk_size=args.chunk_size, seed=args.seed,
                           output=_output_selector(args.output))
    if args.method == "adjoint":
        raise UsageError(f"--method adjoint needs a PyTorch model; the {loaded.describe()} is "
                         "reconstructed with the basis method")
    if args.dtype == "float64":
        raise UsageError("ONNX models are reconstructed in float32 (onnxruntime's CPU convolution has no "
                         "float64 kernel): drop --dtype, or use a state_dict with --arch for float64")
    if args.output is not None:
        raise UsageError("--output applies to PyTorch models; ONNX models use their first output")
    from . import onnx as rv_onnx

    path = _onnx_file(loaded, x, workdir)
    return rv_onnx.reconstruct(str(path), x.to(torch.float32), classes=classes, basis=args.basis,
                               chunk_size=args.chunk_size)


def _verify(loaded: LoadedModel, rec: Any, x: Any, args: argparse.Namespace, names: list[str] | None,
            workdir: Path, tolerance: float | None = None) -> Any:
    from . import verify

    if loaded.kind == "torch":  # verify falls back to rec's output selector
        return verify(loaded.module, rec, x, tolerance=tolerance, backend=args.backend,
                      output=_output_selector(args.output), class_names=names)
    if args.backend != "torch":
        raise UsageError(f"--backend applies to PyTorch models; the {loaded.describe()} is verified "
                         "with onnxruntime")
    return _verify_external(loaded, rec, x, names, workdir, tolerance)


def _verify_external(loaded: LoadedModel, rec: Any, x: Any, names: list[str] | None, workdir: Path,
                     tolerance: float | None) -> Any:
    """The Table 1 view for a model only onnxruntime can run (ONNX, TorchScript)."""
    from .reconstruction import relative_error
    from .verify import Comparison, VerificationReport, class_columns

    x = rec.probes if x is None else rec.check_input(x)
    x = x.to(rec.weight.dtype)
    tensor = rec.meta.get("logits_tensor")  # the logits reconviz.onnx reconstructed (before a final Softmax)
    original = class_columns(model_logits(loaded, x, None, workdir, tensor), rec.classes.cpu()).to(rec.weight.dtype)
    rebuilt = rec(x)
    tol = rec.tolerance if tolerance is None else tolerance
    a, b = "reconstructed (torch)", "original (onnxruntime)"
    report = VerificationReport(
        classes=rec.classes.tolist(),
        columns={b: original.detach().cpu().numpy(), a: rebuilt.detach().cpu().numpy()},
        comparisons=[Comparison(a, b, float((rebuilt - original).abs().max()),
                                float(relative_error(rebuilt, original).max()), tol)],
        dtype=str(rec.weight.dtype).replace("torch.", ""),
        exactness=rec.exactness,
        class_names=names,
        self_checks=rec.self_checks,
    )
    report.notes.append(f"{loaded.describe()} run by onnxruntime in float32; W vs Jacobian and the "
                        "certified radius need a PyTorch model (--arch + state_dict)")
    report.notes += [str(n) for n in rec.meta.get("notes", [])]  # e.g. a final Softmax stepped over
    return report


def _check_names(names: list[str] | None, classes: Any) -> None:
    if names is not None and classes is not None and len(classes) and max(int(c) for c in classes) >= len(names):
        raise UsageError(f"--class-names gives {len(names)} names, but class {max(int(c) for c in classes)} "
                         "is reconstructed")


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _figures(rec: Any, out: Path, names: list[str] | None, probes: Sequence[int], labels: Sequence[str]) -> list[Path]:
    """Templates and contribution maps per probe: ``templates_<label>.png``, ``contributions_<label>.png``."""
    _use_agg()
    import matplotlib.pyplot as plt

    from . import plot

    written = []
    for n, label in zip(probes, labels):
        for kind, draw in (("templates", plot.templates), ("contributions", plot.contributions)):
            path = out / f"{kind}_{label}.png"
            fig = draw(rec, probe=n, class_names=names, path=str(path))
            plt.close(fig)
            written.append(path)
    return written


def _use_agg() -> None:
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        with contextlib.suppress(Exception):
            matplotlib.use("Agg")


def _figure_probes(n_probes: int, chosen: Sequence[int] | None = None) -> list[int]:
    if chosen is None:
        return list(range(min(n_probes, MAX_FIGURE_PROBES)))
    bad = [p for p in chosen if not 0 <= p < n_probes]
    if bad:
        raise UsageError(f"--probe {bad[0]} is out of range: the reconstruction has {n_probes} probe(s)")
    return list(dict.fromkeys(chosen))


def _write_report(report: Any, out: Path) -> list[Path]:
    from .files import atomic_write

    text, js = out / "report.txt", out / "report.json"
    atomic_write(text, lambda f: f.write((str(report) + "\n").encode()))
    atomic_write(js, lambda f: f.write((report.to_json() + "\n").encode()))
    return [text, js]


def _print_written(paths: Sequence[Path], out: Path) -> None:
    print(f"\nwrote {len(paths)} file(s) to {out.resolve()}:")
    for p in paths:
        print(f"  {p}")


def _out_dir(text: str | Path) -> Path:
    """The output folder, created and checked writable (before any work is done)."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder: choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {out}: {e.strerror or e}; choose a writable --out") from e
    return out


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import reconviz as rv

    out = _out_dir(args.out)
    start = time.perf_counter()
    model, data = rv.models.digits()
    y = torch.as_tensor(data.y_test)
    labels = sorted({int(c) for c in y.tolist()})
    picks = [int((y == c).nonzero()[0]) for c in labels]  # the first test digit of each class
    x = torch.as_tensor(data.x_test[picks], dtype=torch.float64)
    names = list(data.class_names)
    print(f"reconviz demo: the bundled digits CNN ({sum(p.numel() for p in model.parameters())} parameters) "
          f"reconstructed at the first test digit of each class ({len(picks)} probes, input {tuple(x.shape[1:])})\n")

    rec = rv.reconstruct(model, x)
    report = rv.verify(model, rec, class_names=names)
    print(report)

    _use_agg()
    import matplotlib.pyplot as plt

    written = [rec.save(out / REC_NAME), *_write_report(report, out)]
    labels_text = [f"digit{names[c]}" for c in labels]
    written += _figures(rec, out, names, range(len(picks)), labels_text)

    saliency_path = out / "saliency.png"
    fig = _saliency_figure(model, x, rec, names, [int(c) for c in labels])
    fig.savefig(saliency_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(saliency_path)

    fig = rv.plot.overview(model, x, rec, probe=0, class_names=names, path=str(out / "overview.png"))
    plt.close(fig)
    written.append(out / "overview.png")
    fig = rv.plot.equivalence(report, path=str(out / "equivalence.png"))
    plt.close(fig)
    written.append(out / "equivalence.png")

    _print_written(written, out)
    verdict = "PASS" if report.ok else "FAIL"
    print(f"\n{verdict}: f(x) = W x + b reproduces all {rec.n_classes} logits at {rec.n_probes} digits "
          f"(max relative error {report.max_rel_error:.1e}, tolerance {report.tolerance:g}) "
          f"in {time.perf_counter() - start:.1f} s")
    return EXIT_PASS if report.ok else EXIT_FAIL


def _saliency_figure(model: Any, x: Any, rec: Any, names: list[str], targets: list[int]) -> Any:
    """Gradient saliency (Simonyan 2014) next to |W_c|: for a piecewise-linear net they are the same map."""
    import matplotlib.pyplot as plt
    import numpy as np

    from . import saliency

    maps = saliency.saliency_map(saliency.gradient(model, x, targets)).cpu().numpy()  # (N, H, W)
    w = rec.weight.detach().cpu().numpy()
    n = len(targets)
    fig, axes = plt.subplots(3, n, figsize=(1.25 * n, 4.2), squeeze=False)
    worst = 0.0
    for i, c in enumerate(targets):
        k = int((rec.classes == c).nonzero()[0])
        wabs = np.abs(w[i, k]).max(axis=0)
        worst = max(worst, float(np.abs(wabs - maps[i]).max()))
        rows = ((x[i, 0].cpu().numpy(), "gray_r", f"{names[c]}"), (maps[i], "hot", None), (wabs, "hot", None))
        for r, (img, cmap, title) in enumerate(rows):
            ax = axes[r, i]
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if title:
                ax.set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("gradient\nsaliency", fontsize=8)
    axes[2, 0].set_ylabel("|W_c|\n(max over C)", fontsize=8)
    fig.suptitle(f"Gradient saliency of the true class = |W_c| of the reconstruction (max diff {worst:.1e})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def cmd_reconstruct(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, args)
    pre = preprocessing(args)
    x = load_inputs(args.inputs, pre)
    out = _out_dir(args.out)
    names = parse_class_names(args.class_names)
    output = _output_selector(args.output)
    classes = parse_classes(args.classes, lambda: model_logits(loaded, x, output, out))
    _check_names(names, classes)

    start = time.perf_counter()
    rec = _reconstruct(loaded, x, args, classes, out)
    rec.meta["cli"] = {
        "model": str(args.model), "model_kind": loaded.kind, "arch": args.arch,
        "arch_kwargs": args.arch_kwargs, "inputs": [str(p) for p in args.inputs],
        "preprocess": {k: v for k, v in pre.items() if v is not None},
    }
    if names is not None:
        rec.meta["class_names"] = names
    seconds = time.perf_counter() - start
    _check_names(names, rec.classes.tolist())
    report = _verify(loaded, rec, None, args, names, out)

    print(f"reconstructed the {loaded.describe()} {args.model} at {rec.n_probes} probe(s), "
          f"{rec.n_classes} class(es), input {rec.sample_shape}, {rec.meta.get('method')} solve, "
          f"{str(rec.weight.dtype).replace('torch.', '')}, in {seconds:.2f} s\n")
    print(report)
    written = [rec.save(out / REC_NAME), *_write_report(report, out)]
    if not args.no_figures:
        probes = _figure_probes(rec.n_probes)
        written += _figures(rec, out, names, probes, [f"probe{n}" for n in probes])
        if rec.n_probes > len(probes):
            print(f"note: figures for the first {len(probes)} of {rec.n_probes} probes; "
                  f"'reconviz show {out / REC_NAME} --probe N' draws others")
    _print_written(written, out)
    return EXIT_PASS if report.ok else EXIT_FAIL


def cmd_verify(args: argparse.Namespace) -> int:
    rec = load_reconstruction(args.rec)
    loaded = load_model(args.model, args)
    out = _out_dir(args.out) if args.out else None
    x = None
    if args.inputs:
        x = load_inputs(args.inputs, preprocessing(args, recorded_preprocessing(rec, args.rec)))
    names = parse_class_names(args.class_names) or rec.meta.get("class_names")
    _check_names(names, rec.classes.tolist())
    workdir = out or Path(args.rec).resolve().parent
    if loaded.kind == "torchscript" and out is None:
        workdir = Path(tempfile.mkdtemp(prefix="reconviz-"))
    report = _verify(loaded, rec, x, args, names, workdir, tolerance=args.tolerance)
    where = "the stored probes" if x is None else f"{x.shape[0]} input(s)"
    print(f"verifying {args.rec} ({rec.n_probes} probe(s), {rec.n_classes} class(es), {rec.exactness}) "
          f"against the {loaded.describe()} {args.model} at {where}\n")
    print(report)
    if out is not None:
        _print_written(_write_report(report, out), out)
    return EXIT_PASS if report.ok else EXIT_FAIL


def load_reconstruction(path_text: str) -> Any:
    """Reconstruction.load (an InputError names the file and what is wrong with it)."""
    from .reconstruction import Reconstruction

    return Reconstruction.load(_existing_file(path_text, "reconstruction"))


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RECORDED: dict[str, Callable[[Any], bool]] = {  # preprocessing option -> test of its recorded value
    "size": lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and _finite(n) and n >= 1
                                                                  for n in v),
    "grayscale": _flag, "rgb": _flag, "npy_batch": _flag,
    "scale": lambda v: _finite(v) and v != 0,
    "mean": lambda v: isinstance(v, list) and bool(v) and all(map(_finite, v)),
    "std": lambda v: isinstance(v, list) and bool(v) and all(map(_finite, v)),
}


def recorded_preprocessing(rec: Any, path: str) -> dict:
    """The preprocessing 'reconviz reconstruct' recorded in ``rec`` (UsageError when it is not valid)."""
    pre = (rec.meta.get("cli") or {}).get("preprocess") or {}
    bad = [k for k, ok in _RECORDED.items() if k in pre and not ok(pre[k])] if isinstance(pre, dict) else ["all"]
    if bad:
        raise UsageError(f"{path}: the recorded preprocessing is not valid ({', '.join(bad)}); re-create the "
                         "reconstruction with 'reconviz reconstruct'")
    return pre


def cmd_show(args: argparse.Namespace) -> int:
    rec = load_reconstruction(args.rec)
    out = _out_dir(args.out or Path(args.rec).resolve().parent)
    names = parse_class_names(args.class_names) or rec.meta.get("class_names")
    _check_names(names, rec.classes.tolist())
    probes = _figure_probes(rec.n_probes, args.probe)
    print(rec)
    abs_err, rel_err = rec.errors()
    print(f"W x0 + b vs the stored logits: max abs {abs_err:.3e}, max rel {rel_err:.3e} "
          f"(tolerance {rec.tolerance:g})")
    written = _figures(rec, out, names, probes, [f"probe{n}" for n in probes])
    _print_written(written, out)
    return EXIT_PASS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
