"""``reconviz features MODEL DATA --out DIR``: every feature of :mod:`reconviz.features` from the shell.

Writes the figures of :func:`reconviz.features.summary.write_features` and
``features.json`` (atomically) into ``--out``, and prints a short summary. The
command itself (:func:`reconviz.cli.cmd_features`: model loading, the output
folder, exit codes) lives in :mod:`reconviz.cli`, which hands its pieces in:
this module never imports the CLI (no import cycle).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_parser", "run_features", "demo_features"]


def add_parser(sub: Any, parents: list[argparse.ArgumentParser], command: Callable[[argparse.Namespace], int],
               positive_int: Callable[[str], int]) -> None:
    """Register the ``features`` subcommand: ``parents`` (the shared debug, model and input options),
    ``command`` (what runs it) and ``positive_int`` (the CLI's argument type) come from :mod:`reconviz.cli`."""
    _positive_int = positive_int
    p = sub.add_parser(
        "features", parents=parents, help="inside the network: activations, top patches, filters, embeddings, "
                                          "activation maximisation, clustering",
        description="Stream DATA through MODEL and write, into --out: the first layer's filters, the feature maps "
                    "and top-activating patches (cropped to the exact receptive field) of --layer, dead units, "
                    "a t-SNE/PCA embedding of the penultimate features, activation maximisation beside the "
                    "reconstructed templates, clusters of classes and of --layer's neurons (by activation and by "
                    "exact contribution), and features.json. DATA is a folder of images with one subfolder per "
                    "class, a .npy array (N, ...) or a .npz with x and y.")
    p.add_argument("model", metavar="MODEL", help="state_dict .pt (with --arch) or a pickled module (--unsafe-pickle)")
    p.add_argument("data", metavar="DATA", help="a folder of class subfolders of images, a .npy or a .npz (x, y)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g = p.add_argument_group("features")
    g.add_argument("--layer", default=None, metavar="NAME",
                   help="module for feature maps, top patches and neuron clusters (default: the last rectifier with "
                        "(N, C, H, W) outputs)")
    g.add_argument("--channels", default=None, metavar="LIST", help="channels for top patches (default: first 16)")
    g.add_argument("--k", type=_positive_int, default=9, help="top patches per channel (default 9)")
    g.add_argument("--embedding", choices=["tsne", "pca"], default="tsne", help="2-D embedding (default tsne)")
    g.add_argument("--classes", default=None, metavar="LIST",
                   help="classes for activation maximisation (default: the first 10)")
    g.add_argument("--steps", type=_positive_int, default=100, help="activation maximisation steps (default 100)")
    g.add_argument("--clusters", type=_positive_int, default=4, help="clusters of classes and neurons (default 4)")
    g.add_argument("--no-contributions", action="store_true",
                   help="skip the neuron clusters by exact contribution (one reconstruction per batch)")
    g.add_argument("--batch-size", type=_positive_int, default=256, metavar="B", help="samples per batch")
    g.add_argument("--seed", type=int, default=0, help="seed of t-SNE, k-means and the maximisation's jitter")
    p.set_defaults(func=command)


def check_args(args: argparse.Namespace) -> None:
    """Options of the shared groups that do not apply here: a usage error."""
    from ..io import UsageError

    if args.output is not None or args.npy_batch:
        raise UsageError("'reconviz features' takes models that return the logits (N, K) and .npy arrays (N, ...): "
                         "--output and --npy-batch do not apply")


def run_features(model: Any, args: argparse.Namespace, out: Path) -> list[Path]:
    """Compute and write everything for the parsed ``args``; print a summary; return the files written."""
    from ..io import int_list, load_class_names
    from .summary import Settings, write_features

    settings = Settings(layer=args.layer, channels=int_list(args.channels, "--channels"), k=args.k,
                        method=args.embedding, classes=int_list(args.classes, "--classes"), steps=args.steps,
                        clusters=args.clusters, contributions=not args.no_contributions,
                        batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    print(f"features of {args.model} over {args.data}")
    files, summary = write_features(model, _data(args), out, settings,
                                    class_names=load_class_names(args.class_names), log=print)
    _report(summary, time.perf_counter() - start)
    return files


def _data(args: argparse.Namespace) -> Any:
    """DATA with --size / --grayscale / --rgb (folders) and --scale, --mean, --std applied to every batch."""
    from ..data import Mapped, normaliser, open_path

    channels = 1 if args.grayscale else 3 if args.rgb else None
    source = open_path(args.data, size=args.size, channels=channels)
    transform = normaliser(args.scale, args.mean, args.std)
    return source if transform is None else Mapped(source, transform)


def _report(summary: dict[str, Any], seconds: float) -> None:
    dead = summary["dead_units"]
    print(f"\nlayer {summary['layer']}; {dead['n_inputs']} inputs, in {seconds:.1f} s")
    for row in dead["layers"]:
        print(f"  dead units of {row['layer']}: {row['dead']}/{row['units']} ({row['fraction']:.1%}), "
              f"dead channels {row['dead_channels']}/{row['channels']}")
    sep = summary["embedding"]["separation"]
    if sep:
        knn = "n/a" if sep["knn_accuracy"] is None else f"{sep['knn_accuracy']:.3f}"
        print(f"  {summary['embedding']['method']} of the {summary['embedding']['layer']}: 5-NN accuracy {knn}, "
              f"silhouette {sep['silhouette']:.3f}")
    m = summary["maximisation"]
    print(f"  activation maximisation: the target logit wins for {sum(m['target_wins'])}/{len(m['classes'])} classes")
    for name, c in summary["clusters"].items():
        groups = "; ".join(f"{{{', '.join(g['members'][:6])}{', ...' if len(g['members']) > 6 else ''}}}"
                           for g in c["clusters"])
        print(f"  clusters of {c['what']}: {groups}")


def demo_features(model: Any, names: list[str], out: Any, n: int = 150) -> list[Any]:
    """The demo's features over the first ``n`` test digits, with cheap settings (PCA, 30 maximisation
    steps), into ``out / 'features'``."""
    import torch

    from ..models import load_data
    from .summary import Settings, write_features

    data = load_data()
    xy = (torch.as_tensor(data.x_test[:n]), torch.as_tensor(data.y_test[:n]))
    settings = Settings(channels=range(8), method="pca", steps=30, k=6, probes=50, clusters=4, dpi=72)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the digits CNN is tiny: one thread is ~4x faster than two on a busy 2-core machine
    try:
        files, _ = write_features(model, xy, out / "features", settings, class_names=names)
    finally:
        torch.set_num_threads(threads)
    return files
