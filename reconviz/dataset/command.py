"""``reconviz dataset MODEL DATA --out ts.npz``: class-mean templates over a dataset from the shell.

Under ``torchrun --nproc-per-node P -m reconviz dataset ...`` every process joins
the process group torchrun describes (gloo on CPU, nccl with CUDA, one GPU per
process by LOCAL_RANK), solves its shard, and rank 0 writes ``--out`` (and
``--figure``) atomically once the accumulators are pooled.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_dataset"]

EXIT_PASS, EXIT_FAIL = 0, 1  # reconviz.cli's codes (it imports this module: no import back)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``dataset`` subcommand (``parents``: the shared debug, model and input options)."""
    from .run import BY

    p = sub.add_parser(
        "dataset", parents=parents, help="class-mean templates over a whole dataset (streamed, resumable, torchrun)",
        description="Reconstruct MODEL exactly at every sample of DATA and write the per-class mean, std and count "
                    "of the templates W_c (a TemplateSet .npz). DATA is a .npy array (N, ...) or a folder of "
                    "images with one subfolder per class. Runs sharded under torchrun.")
    p.add_argument("model", metavar="MODEL", help="state_dict .pt (with --arch) or a pickled module (--unsafe-pickle)")
    p.add_argument("data", metavar="DATA", help="a .npy array (N, ...) or a folder of class subfolders of images")
    p.add_argument("--out", required=True, metavar="TS.npz", help="the template set file (written by rank 0)")
    p.add_argument("--by", choices=BY, default="label",
                   help="label: each sample's true class (one backward pass per batch); prediction: its predicted "
                        "class (one per batch); all: every class (one per class)")
    p.add_argument("--classes", default=None, metavar="LIST", help="comma-separated output indices (default: all)")
    p.add_argument("--labels", default=None, metavar="Y.npy", help="labels (N,) for a .npy DATA (by label)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="samples per batch (default 256)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="save progress here every --checkpoint-every batches; rerun with it to resume")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="batches between checkpoints")
    p.add_argument("--figure", default=None, metavar="F.png", help="also draw the class templates (mean, std, count)")
    p.set_defaults(func=cmd_dataset)


def cmd_dataset(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..io import UsageError, int_list, load_class_names, load_model
    from .distributed import init_from_env

    out = _out_file(args.out)
    if args.figure and Path(args.figure).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--figure {args.figure}: give a .png, .svg or .pdf file")
    loaded = load_model(args.model, arch=args.arch, arch_kwargs=args.arch_kwargs, unsafe_pickle=args.unsafe_pickle)
    if not loaded.is_torch:
        raise UsageError(f"'reconviz dataset' runs in PyTorch; the {loaded.describe()} {args.model} is not a PyTorch "
                         "model: pass a state_dict .pt with --arch (or a pickled module with --unsafe-pickle)")
    names = load_class_names(args.class_names)
    classes = int_list(args.classes, "--classes")
    created = init_from_env()
    try:
        ts, seconds = _run(loaded.module, args, classes)
        if not dist.is_initialized() or dist.get_rank() == 0:
            _write(ts, out, args.figure, names, seconds)
    finally:
        if created:
            dist.destroy_process_group()
    return EXIT_PASS if ts.exact > 0 else EXIT_FAIL


def _run(model: Any, args: argparse.Namespace, classes: Any) -> tuple[Any, float]:
    import os

    import torch

    from ..data import normaliser
    from ..io import output_selector
    from . import reconstruct_dataset

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        model = model.to(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    start = time.perf_counter()
    ts = reconstruct_dataset(model, _data(args), classes=classes, by=args.by, batch_size=args.batch_size,
                             checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                             transform=normaliser(args.scale, args.mean, args.std),
                             output=output_selector(args.output))
    return ts, time.perf_counter() - start


def _data(args: argparse.Namespace) -> Any:
    """A .npy DATA (with --labels: the pair), or a folder as an ImageFolder with --size / --grayscale / --rgb."""
    import numpy as np

    from ..data import ImageFolder
    from ..io import UsageError
    from .source import prepare

    path = Path(args.data)
    if path.is_dir():
        channels = 1 if args.grayscale else 3 if args.rgb else None
        if args.labels:
            raise UsageError("--labels is for a .npy DATA; a folder's labels are its subfolders")
        return ImageFolder(path, size=args.size, channels=channels)
    x = prepare(path)
    if args.labels is None:
        return x
    try:
        y = np.load(args.labels, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --labels {args.labels}: {e}") from e
    if y.shape != (x.shape[0],):
        raise UsageError(f"--labels {args.labels} has shape {y.shape}; DATA has {x.shape[0]} samples")
    return x, y


def _out_file(text: str) -> Path:
    from ..io import UsageError

    out = Path(text)
    if out.suffix.lower() != ".npz" or out.is_dir():
        raise UsageError(f"--out {out}: give a .npz file for the template set")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write(ts: Any, out: Path, figure: str | None, names: list[str] | None, seconds: float) -> None:
    ts.save(out)
    written = [out]
    if figure:
        from ..plot import class_templates

        class_templates(ts, class_names=names, path=figure)
        written.append(Path(figure))
    m = ts.meta
    print(f"{m['probes']} probes by {m['by']} in {seconds:.2f} s ({m['probes'] / max(seconds, 1e-9):.0f} probes/s, "
          f"{m['world_size']} process(es)): {ts.exact} verified exact (max relative error {m['max_rel_error']:.1e}, "
          f"tolerance {m['tolerance']:g}), {len(ts.failed)} failed, {m['skipped']} skipped")
    print("count per class: " + ", ".join(f"{int(c)}: {int(n)}" for c, n in zip(ts.classes, ts.count)))
    for f in ts.failed[:5]:
        print(f"  failed probe {f.index}: {f.reason}")
    print("wrote " + ", ".join(str(p) for p in written))
