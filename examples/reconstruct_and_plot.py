"""Reconstruct a CNN at one input as f(x) = W x + b, check it, and plot it.

The whole workflow on the bundled digits CNN (8x8 grey digits, ten classes):

    python examples/reconstruct_and_plot.py                 # figures into reconstruct-and-plot/
    python examples/reconstruct_and_plot.py --index 7 --out figs/

For your own model, replace ``rv.models.digits()`` by your ``nn.Module`` (in
eval mode) and ``x`` by a batch of your inputs (N, C, H, W).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures to files; no screen needed

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import reconviz as rv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=0, help="which test digit to explain (default 0)")
    parser.add_argument("--out", default="reconstruct-and-plot", help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. A trained model and one input (a batch of N = 1 probe).
    model, data = rv.models.digits()
    x = torch.as_tensor(data.x_test[args.index : args.index + 1])
    names = list(data.class_names)

    # 2. Reconstruct: W has the input's shape per class, b one number per class.
    rec = rv.reconstruct(model, x)  # float64; method="auto" picks basis or adjoint
    print(rec)
    print(f"W {tuple(rec.weight.shape)}  b {tuple(rec.bias.shape)}  true class {names[int(data.y_test[args.index])]}")

    # 3. Verify: original and reconstructed logits side by side (the paper's Table 1).
    report = rv.verify(model, rec, class_names=names)
    print(report)

    # 4. Completeness: the contribution map W_c * x plus b_c is the logit, exactly.
    total = rec.contributions().flatten(2).sum(-1) + rec.bias
    gap = float((total - rec.logits).abs().max())
    print(f"sum(W_c * x) + b_c - logit: max {gap:.1e}")

    # 5. Plot: class templates, contribution maps, the overview; save the reconstruction.
    figures = {
        "templates.png": rv.plot.templates(rec, probe=0, class_names=names),
        "contributions.png": rv.plot.contributions(rec, probe=0, class_names=names),
        "overview.png": rv.plot.overview(model, x, rec, probe=0, class_names=names),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
    rec.save(out / "reconstruction.npz")  # rv.Reconstruction.load(...) reads it back
    print(f"wrote {', '.join(figures)} and reconstruction.npz to {out}/")
    return 0 if report.ok and gap <= rec.tolerance * max(1.0, float(rec.logits.abs().max())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
