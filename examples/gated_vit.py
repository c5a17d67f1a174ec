"""A small vision transformer trained in seconds on the bundled digits, reconstructed
point-exactly under both rules, its templates beside the gradients.

The ViT: 2x2 patches of the 8x8 digit (16 tokens), a class token and position embeddings,
two pre-norm blocks of ``nn.MultiheadAttention`` and a GELU MLP, LayerNorm, a linear head.
Nothing in it is piecewise linear, so no region-exact model exists: reconviz freezes its
gates at the probe instead ("point-exact", docs/exactness.md) under two rules:

* ``value``: the softmax attention weights, LayerNorm's 1/sigma and GELU's Phi frozen at
  their values; W_c * x plus b_c sums to the logit and b_c holds the model's own biases only;
* ``tangent``: W is the Jacobian at x (the gradient of the logit), b = f(x) - W x.

Writes ``--out`` (default ``gated_vit/``): ``gated_vit.png`` (per digit: the input, the value
template of the predicted class and its contributions W_c * x, the tangent template = the
gradient, and Gradient x Input) and prints the checks.

Run: ``python examples/gated_vit.py --out figures``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import reconviz as rv  # noqa: E402


class DigitsViT(nn.Module):
    """2x2 patches -> d-dim tokens, class token, position embedding, ``depth`` pre-norm blocks."""

    def __init__(self, d: int = 24, heads: int = 2, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        z = self.patch(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls.expand(len(z), -1, -1), z], 1) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z[:, 0]))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, z):
        h = self.norm1(z)
        z = z + self.attn(h, h, h, need_weights=False)[0]
        return z + self.mlp(self.norm2(z))


def train(epochs: int, seed: int = 0) -> tuple[DigitsViT, float, object]:
    """Adam on the bundled digits' training split; returns the model, its test accuracy, the data."""
    torch.manual_seed(seed)
    _, data = rv.models.digits()
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train).long()
    model = DigitsViT()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(data.x_test)).argmax(1)
    return model, float((pred == torch.as_tensor(data.y_test)).double().mean()), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gated_vit", help="output folder (created if missing)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 3, 8], help="digits to show")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, accuracy, data = train(args.epochs)
    print(f"trained in {time.perf_counter() - start:.1f} s: held-out accuracy {accuracy:.1%}")

    y_test = torch.as_tensor(data.y_test)
    x = torch.as_tensor(data.x_test)[[int((y_test == d).nonzero()[0]) for d in args.digits]].double()
    recs = {rule: rv.reconstruct(model, x, linearization=rule) for rule in ("value", "tangent")}
    for rule, rec in recs.items():
        report = rv.verify(model, rec, radius=False)
        print(f"{rule:>7}: {rec.exactness}, max relative error {rec.meta['max_rel_error']:.1e} "
              f"(tolerance {rec.tolerance:g}), frozen {sorted({f.gate for f in rec.frozen})}: "
              f"{'PASS' if report.ok else 'FAIL'}")
    value, tangent = recs["value"], recs["tangent"]
    pred = value.logits.argmax(1)
    rows = [("input", lambda i, c: x[i, 0]),
            ("value template W_c", lambda i, c: value.weight[i, c, 0]),
            ("value W_c * x", lambda i, c: value.contributions()[i, c, 0]),
            ("tangent W_c = gradient", lambda i, c: tangent.weight[i, c, 0]),
            ("gradient x input", lambda i, c: tangent.contributions()[i, c, 0])]
    fig, axes = plt.subplots(len(args.digits), len(rows), figsize=(2.2 * len(rows), 2.3 * len(args.digits)),
                             squeeze=False)
    for i, c in enumerate(pred.tolist()):
        for j, (title, image) in enumerate(rows):
            img = image(i, c).numpy()
            lim = max(abs(img).max(), 1e-12)
            ax = axes[i, j]
            ax.imshow(img, cmap="gray" if j == 0 else "RdBu_r", vmin=0 if j == 0 else -lim, vmax=lim if j else None)
            ax.set_title(f"{title}\n(digit {args.digits[i]}, class {c})" if j else f"digit {args.digits[i]}",
                         fontsize=8)
            ax.axis("off")
    fig.suptitle(f"ViT on the digits ({accuracy:.0%}): point-exact templates under both rules", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "gated_vit.png", dpi=90)
    plt.close(fig)
    sums = (value.contributions().flatten(2).sum(-1) + value.bias - value.logits).abs().max()
    print(f"value rule: sum(W_c * x) + b_c - logit_c = {float(sums):.1e} at every probe and class")
    print(f"wrote {out / 'gated_vit.png'} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
