"""The ``reconviz`` command line: ``demo``, ``reconstruct``, ``verify``, ``show``, ``report``, ``dataset``,
``features``.

Argument parsing and one function per command: models, inputs and saved
reconstructions are loaded by :mod:`reconviz.io`; the work is the library's
(``reconviz.reconstruct``, ``reconviz.verify``, ``reconviz.onnx``, ``reconviz.plot``).

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
import math
import shlex
import sys
import tempfile
import time
import traceback
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ReconvizError
from .io import (PREPROCESS_KEYS, LoadedModel, UsageError, load_class_names, load_digits, load_inputs, load_model,
                 load_reconstruction, one_line, output_selector, recorded_preprocessing)

__all__ = ["main", "UsageError"]

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
REC_NAME = "reconstruction.npz"
DEMO_TOP = 5  # classes per probe on the demo's report page (its templates: the top five of ten)
MAX_FIGURE_PROBES = 16

_onnx_file = LoadedModel.onnx_file  # (loaded, x, workdir): a TorchScript model's ONNX export


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
                                   "class templates, contribution maps, a gradient saliency figure and "
                                   "report.html (the whole story on one self-contained HTML page).")
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
    _model_and_inputs(p, "TorchScript .pt, ONNX .onnx, or state_dict .pt (with --arch)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g = p.add_argument_group("reconstruction")
    g.add_argument("--classes", default=None, metavar="LIST|top-K",
                   help="classes to reconstruct: comma-separated indices, top-K (the K largest logits "
                        "of each probe), or all (default)")
    g.add_argument("--method", choices=["auto", "basis", "adjoint", "head"], default="auto",
                   help="basis: the paper's orthogonal-basis solve; adjoint: one backward pass per "
                        "class; head: through the affine head's narrowest cut; auto: the cheapest "
                        "(default)")
    g.add_argument("--linearization", choices=["value", "tangent"], default="value",
                   help="value: gates frozen at their values (default; region-exact on piecewise-linear "
                        "nets); tangent: the Jacobian at the input (PyTorch models)")
    g.add_argument("--basis", choices=["identity", "hadamard", "random"], default="identity",
                   help="orthonormal basis of the basis solve (default: identity, one by one)")
    g.add_argument("--dtype", choices=["float64", "float32"], default=None,
                   help="working precision (default float64; ONNX models run in float32)")
    g.add_argument("--chunk-size", type=_positive_int, default=None, metavar="M",
                   help="basis columns per forward pass / classes per backward pass")
    g.add_argument("--seed", type=int, default=0, help="seed of the random basis (default 0)")
    _backend_option(g)
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
    _backend_option(p)
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

    # report -----------------------------------------------------------------
    p = sub.add_parser(
        "report", parents=[debug, model_opts, input_opts],
        help="write one self-contained HTML report of a model reconstructed at input files",
        description="Reconstruct MODEL (a PyTorch model: a state_dict .pt with --arch, or a pickled module "
                    "with --unsafe-pickle) at the INPUT files, verify it, and write one self-contained HTML "
                    "page: the model, the equivalence table, templates, contribution and saliency maps with "
                    "their faithfulness metrics.",
    )
    _model_and_inputs(p, "state_dict .pt (with --arch) or a pickled module")
    p.add_argument("--out", default="report.html", metavar="FILE",
                   help="the HTML file (default report.html; a folder gets report.html inside)")
    p.add_argument("--classes", default=None, metavar="LIST|top-K", help="classes to reconstruct (as for reconstruct)")
    p.add_argument("--top", type=_positive_int, default=3, metavar="K", help="classes shown per probe (default 3)")
    _backend_option(p)
    p.set_defaults(func=cmd_report)

    # dataset ----------------------------------------------------------------
    from .dataset.command import add_parser as add_dataset_parser

    add_dataset_parser(sub, [debug, model_opts, input_opts])

    # features ---------------------------------------------------------------
    from .features.command import add_parser as add_features_parser

    add_features_parser(sub, [debug, model_opts, input_opts], cmd_features, _positive_int)
    return parser


def _backend_option(p: Any) -> None:
    p.add_argument("--backend", choices=["torch", "onnxruntime", "both"], default="torch",
                   help="verify in PyTorch (default), onnxruntime, or both (torch models)")


def _model_and_inputs(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files (PNG, JPEG, ...) or .npy arrays")


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
        args.command_line = shlex.join(["reconviz", *argv])
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

    text = one_line(e)
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
# Options -> reconviz.io
# ---------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, arch=args.arch, arch_kwargs=args.arch_kwargs, unsafe_pickle=args.unsafe_pickle)


def preprocessing(args: argparse.Namespace, recorded: dict | None = None) -> dict:
    """The preprocessing options given on the command line, else those recorded, else defaults."""
    recorded = recorded or {}
    return {k: getattr(args, k) if getattr(args, k, None) is not None else recorded.get(k) for k in PREPROCESS_KEYS}


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
        top = out.topk(min(k, out.shape[1]), dim=1).indices
        order = out.max(dim=0).values  # the union, largest logit first
        return sorted({int(c) for c in top.reshape(-1)}, key=lambda c: -float(order[c]))
    try:
        return [int(c) for c in t.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes: expected comma-separated indices, top-K or all, got {text!r}") from None


def _check_names(names: list[str] | None, classes: Any) -> None:
    if names is not None and classes is not None and len(classes) and max(int(c) for c in classes) >= len(names):
        raise UsageError(f"--class-names gives {len(names)} names, but class {max(int(c) for c in classes)} "
                         "is reconstructed")


# ---------------------------------------------------------------------------
# A loaded model -> the library: reconstruct, verify
# ---------------------------------------------------------------------------


def _reconstruct(loaded: LoadedModel, x: Any, args: argparse.Namespace, classes: Any, workdir: Path) -> Any:
    import torch

    from . import reconstruct

    if loaded.is_torch:
        dtype = torch.float32 if args.dtype == "float32" else torch.float64
        return reconstruct(loaded.module, x, classes=classes, method=args.method, basis=args.basis,
                           dtype=dtype, chunk_size=args.chunk_size, seed=args.seed,
                           output=output_selector(args.output), linearization=args.linearization)
    if args.method in ("adjoint", "head"):
        raise UsageError(f"--method {args.method} needs a PyTorch model; the {loaded.describe()} is "
                         "reconstructed with the basis method")
    if args.linearization != "value":
        raise UsageError(f"--linearization {args.linearization} needs a PyTorch model; the "
                         f"{loaded.describe()} is reconstructed under the value rule")
    if args.dtype == "float64":
        raise UsageError("ONNX models are reconstructed in float32 (onnxruntime's CPU convolution has no "
                         "float64 kernel): drop --dtype, or use a state_dict with --arch for float64")
    if args.output is not None:
        raise UsageError("--output applies to PyTorch models; ONNX models use their first output")
    from . import onnx as rv_onnx

    return rv_onnx.reconstruct(str(loaded.onnx_file(x, workdir)), x.to(torch.float32), classes=classes,
                               basis=args.basis, chunk_size=args.chunk_size)


def _verify(loaded: LoadedModel, rec: Any, x: Any, args: argparse.Namespace, names: list[str] | None,
            workdir: Path | None, tolerance: float | None = None) -> Any:
    from . import verify

    if loaded.is_torch:  # verify falls back to rec's output selector
        return verify(loaded.module, rec, x, tolerance=tolerance, backend=args.backend,
                      output=output_selector(args.output), class_names=names)
    if args.backend != "torch":
        raise UsageError(f"--backend applies to PyTorch models; the {loaded.describe()} is verified "
                         "with onnxruntime")
    return _verify_external(loaded, rec, x, names, workdir, tolerance)


def _verify_external(loaded: LoadedModel, rec: Any, x: Any, names: list[str] | None, workdir: Path | None,
                     tolerance: float | None) -> Any:
    """The Table 1 view for a model only onnxruntime can run (ONNX, TorchScript). Not ``reconviz.verify``:
    that runs the original model in PyTorch (its column, W vs the Jacobian, the radius)."""
    from .verify import VerificationReport, class_columns, compare

    x = (rec.probes if x is None else rec.check_input(x)).to(rec.weight.dtype)
    tensor = rec.meta.get("logits_tensor")  # the logits reconviz.onnx reconstructed (before a final Softmax)
    original = class_columns(loaded.logits(x, None, workdir, tensor), rec.classes.cpu()).to(rec.weight.dtype)
    rebuilt = rec(x)
    a, b = "reconstructed (torch)", "original (onnxruntime)"
    report = VerificationReport(
        classes=rec.classes.tolist(),
        columns={b: original.detach().cpu().numpy(), a: rebuilt.detach().cpu().numpy()},
        comparisons=[compare(a, b, rebuilt, original, rec.tolerance if tolerance is None else tolerance)],
        dtype=str(rec.weight.dtype).replace("torch.", ""), exactness=rec.exactness, class_names=names,
        self_checks=rec.self_checks,
    )
    report.notes.append(f"{loaded.describe()} run by onnxruntime in float32; W vs Jacobian and the "
                        "certified radius need a PyTorch model (--arch + state_dict)")
    report.notes += [str(n) for n in rec.meta.get("notes", [])]  # e.g. a final Softmax stepped over
    return report


# ---------------------------------------------------------------------------
# Output: the folder, the report, the figures
# ---------------------------------------------------------------------------


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


def _use_agg() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        with contextlib.suppress(Exception):
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, **kw: Any) -> Path:
    """Save (when ``kw`` says how; reconviz.plot functions save themselves) and close ``fig``."""
    if kw:
        fig.savefig(path, **kw)
    _use_agg().close(fig)
    return path


def _figures(rec: Any, out: Path, names: list[str] | None, probes: Sequence[int], labels: Sequence[str]) -> list[Path]:
    """Templates and contribution maps per probe: ``templates_<label>.png``, ``contributions_<label>.png``."""
    _use_agg()
    from . import plot

    written = []
    for n, label in zip(probes, labels):
        for kind, draw in (("templates", plot.templates), ("contributions", plot.contributions)):
            path = out / f"{kind}_{label}.png"
            written.append(_save(draw(rec, probe=n, class_names=names, path=str(path)), path))
    return written


def _figure_probes(n_probes: int, chosen: Sequence[int] | None = None) -> list[int]:
    if chosen is None:
        return list(range(min(n_probes, MAX_FIGURE_PROBES)))
    bad = [p for p in chosen if not 0 <= p < n_probes]
    if bad:
        raise UsageError(f"--probe {bad[0]} is out of range: the reconstruction has {n_probes} probe(s)")
    return list(dict.fromkeys(chosen))


def _saliency_figure(model: Any, x: Any, rec: Any, names: list[str], targets: list[int]) -> Any:
    """Gradient saliency (Simonyan 2014) next to |W_c|: for a piecewise-linear net they are the same map."""
    import numpy as np

    from . import saliency

    plt = _use_agg()
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


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import reconviz as rv
    from .report import render, write

    out = _out_dir(args.out)
    start = time.perf_counter()
    demo = load_digits()
    model, x, names, labels = demo.model.module, demo.x, demo.class_names, demo.labels
    print(f"reconviz demo: the bundled digits CNN ({sum(p.numel() for p in model.parameters())} parameters) "
          f"reconstructed at the first test digit of each class ({len(labels)} probes, input {tuple(x.shape[1:])})\n")

    rec = rv.reconstruct(model, x)
    report = rv.verify(model, rec, class_names=names)
    print(report)

    written = [rec.save(out / REC_NAME), *_write_report(report, out)]
    page = render(model, x, rec=rec, verification=report, class_names=names, top=DEMO_TOP, figure_dir=out,
                  labels=[f"digit{names[c]}" for c in labels], command=args.command_line)  # draws the figures
    written += page.figures
    written += [
        _save(_saliency_figure(model, x, rec, names, labels), out / "saliency.png", dpi=110, bbox_inches="tight"),
        _save(rv.plot.overview(model, x, rec, probe=0, class_names=names, path=str(out / "overview.png")),
              out / "overview.png"),
    ]
    write(page, out / "report.html")
    written.append(out / "report.html")
    from .features.command import demo_features

    written += demo_features(model, names, out)  # inside the network: out/features/
    _print_written(written, out)
    verdict = "PASS" if report.ok else "FAIL"
    print(f"\n{verdict}: f(x) = W x + b reproduces all {rec.n_classes} logits at {rec.n_probes} digits "
          f"(max relative error {report.max_rel_error:.1e}, tolerance {report.tolerance:g}) "
          f"in {time.perf_counter() - start:.1f} s")
    return EXIT_PASS if report.ok else EXIT_FAIL


def cmd_reconstruct(args: argparse.Namespace) -> int:
    loaded = _model(args)
    pre = preprocessing(args)
    x = load_inputs(args.inputs, **pre)
    out = _out_dir(args.out)
    names = load_class_names(args.class_names)
    classes = parse_classes(args.classes, lambda: loaded.logits(x, output_selector(args.output), out))
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
    loaded = _model(args)
    out = _out_dir(args.out) if args.out else None
    x = None
    if args.inputs:
        x = load_inputs(args.inputs, **preprocessing(args, recorded_preprocessing(rec, args.rec)))
    names = load_class_names(args.class_names) or rec.meta.get("class_names")
    _check_names(names, rec.classes.tolist())
    report = _verify(loaded, rec, x, args, names, out, tolerance=args.tolerance)  # TorchScript: a temp folder
    where = "the stored probes" if x is None else f"{x.shape[0]} input(s)"
    print(f"verifying {args.rec} ({rec.n_probes} probe(s), {rec.n_classes} class(es), {rec.exactness}) "
          f"against the {loaded.describe()} {args.model} at {where}\n")
    print(report)
    if out is not None:
        _print_written(_write_report(report, out), out)
    return EXIT_PASS if report.ok else EXIT_FAIL


def cmd_show(args: argparse.Namespace) -> int:
    rec = load_reconstruction(args.rec)
    out = _out_dir(args.out or Path(args.rec).resolve().parent)
    names = load_class_names(args.class_names) or rec.meta.get("class_names")
    _check_names(names, rec.classes.tolist())
    probes = _figure_probes(rec.n_probes, args.probe)
    print(rec)
    abs_err, rel_err = rec.errors()
    print(f"W x0 + b vs the stored logits: max abs {abs_err:.3e}, max rel {rel_err:.3e} "
          f"(tolerance {rec.tolerance:g})")
    _print_written(_figures(rec, out, names, probes, [f"probe{n}" for n in probes]), out)
    return EXIT_PASS


def cmd_report(args: argparse.Namespace) -> int:
    from . import reconstruct, report

    loaded = _model(args)
    if not loaded.is_torch:
        raise UsageError(f"the report runs saliency maps in PyTorch; the {loaded.describe()} {args.model} is not "
                         "a PyTorch model: pass a state_dict .pt with --arch (or a pickled module)")
    path = _report_path(args.out)
    x = load_inputs(args.inputs, **preprocessing(args))
    names = load_class_names(args.class_names)
    classes = parse_classes(args.classes, lambda: loaded.logits(x, output_selector(args.output), None))
    _check_names(names, classes)
    rec = reconstruct(loaded.module, x, classes=classes, output=output_selector(args.output))
    _check_names(names, rec.classes.tolist())
    verification = _verify(loaded, rec, None, args, names, None)
    print(verification)
    report(loaded.module, x, path, rec=rec, verification=verification, class_names=names, top=args.top,
           command=args.command_line)
    _print_written([path], path.parent)
    return EXIT_PASS if verification.ok else EXIT_FAIL


def cmd_features(args: argparse.Namespace) -> int:
    from .features.command import check_args, run_features

    check_args(args)
    out = _out_dir(args.out)
    loaded = _model(args)
    if not loaded.is_torch:
        raise UsageError(f"'reconviz features' runs in PyTorch; the {loaded.describe()} {args.model} is not a PyTorch "
                         "model: pass a state_dict .pt with --arch (or a pickled module with --unsafe-pickle)")
    _use_agg()
    _print_written(run_features(loaded.module, args, out), out)
    return EXIT_PASS


def _report_path(text: str) -> Path:
    """The report's file: ``text``, or ``text/report.html`` for a folder; its folder checked writable."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", "\\")):
        path = path / "report.html"
    _out_dir(path.parent)
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
