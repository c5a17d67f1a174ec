"""The bundled digits CNN, reconstructed exactly and shown beside the classic maps.

Writes to ``--out`` (default ``overview_digits/``):

* ``overview_digit<d>.png``: for the first test image of each chosen digit, the input,
  the template W_c of the predicted class, the contribution map W_c * x, gradient
  saliency, guided backprop, deconvnet and occlusion, side by side;
* ``templates.png``: the ten class templates at the first probe;
* ``contributions.png``: W_c * x for the predicted class and the runner-up, with the
  bar "sum of contributions + bias = logit";
* ``class_mean_templates.png``: the mean template of each class over its test images;
* ``equivalence.png``: original vs reconstructed logits (the paper's Table 1).

Run: ``python examples/overview_digits.py --out figures``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import reconviz as rv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="overview_digits", help="output folder (created if missing)")
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 3, 8],
                        help="digits to draw an overview for (default: 0 3 8)")
    parser.add_argument("--dpi", type=float, default=90, help="resolution of the PNGs (default 90)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model, data = rv.models.digits()
    names = [str(c) for c in data.class_names]
    x_test = torch.as_tensor(data.x_test, dtype=torch.float64)
    y_test = torch.as_tensor(data.y_test).long()
    bad = [d for d in args.digits if not (y_test == d).any()]
    if bad:
        parser.error(f"no test image of digit(s) {bad}; digits are {sorted(set(y_test.tolist()))}")

    # one probe per digit: its first test image
    picks = [int((y_test == d).nonzero()[0]) for d in sorted(set(y_test.tolist()))]
    x = x_test[picks]
    rec = rv.reconstruct(model, x)
    report = rv.verify(model, rec, class_names=names, radius=False)
    print(report)

    written = []
    for d in args.digits:
        n = [int(y_test[p]) for p in picks].index(d)
        path = out / f"overview_digit{d}.png"
        rv.plot.overview(model, x, rec, probe=n, class_names=names, path=path, dpi=args.dpi)
        written.append(path)
    for name, draw in (
        ("templates", lambda p: rv.plot.templates(rec, probe=0, class_names=names, path=p, dpi=args.dpi)),
        ("contributions", lambda p: rv.plot.contributions(rec, probe=0, class_names=names, path=p, dpi=args.dpi)),
        ("equivalence", lambda p: rv.plot.equivalence(report, class_names=names, path=p, dpi=args.dpi)),
    ):
        path = out / f"{name}.png"
        draw(path)
        written.append(path)

    # dataset-level templates: the whole test set, one reconstruction per image
    full = rv.reconstruct(model, x_test, method="adjoint")
    path = out / "class_mean_templates.png"
    rv.plot.class_mean_templates(full, y_test, class_names=names, path=path, dpi=args.dpi)
    written.append(path)

    print(f"\nwrote {len(written)} figures to {out.resolve()} in {time.perf_counter() - start:.1f} s:")
    for p in written:
        print(f"  {p.name}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
