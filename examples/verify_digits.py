"""Verify the reconstruction of the bundled digits CNN on many test digits.

Checks, in order:
  1. held-out accuracy of the model (it is a real, trained classifier);
  2. the three solves (identity basis, Hadamard basis, adjoint) give the same W;
  3. the Table 1 view: original vs reconstructed logits, against the float64 tolerance,
     W against the autograd Jacobian, and the certified radius;
  4. the certified radius means something: at points inside it the reconstruction still
     equals the model;
  5. with --onnx, the same comparison in onnxruntime (float32 tolerance).

    python examples/verify_digits.py [--n 30] [--onnx]

Exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse

import torch

import reconviz as rv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="number of test digits to reconstruct at")
    parser.add_argument("--onnx", action="store_true", help="also verify in onnxruntime")
    args = parser.parse_args(argv)
    checks: dict[str, bool] = {}

    model, data = rv.models.digits()
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    print(f"1. held-out accuracy of the digits CNN: {accuracy:.2%} on {len(y_test)} test digits")
    checks["accuracy > 90%"] = accuracy > 0.90

    x = x_test[: args.n]
    recs = {
        "basis/identity": rv.reconstruct(model, x, method="basis", basis="identity"),
        "basis/hadamard": rv.reconstruct(model, x, method="basis", basis="hadamard"),
        "adjoint": rv.reconstruct(model, x, method="adjoint"),
    }
    ref = recs["basis/identity"]
    spread = max(float((r.weight - ref.weight).abs().max()) for r in recs.values())
    print(f"2. {len(x)} digits x {ref.n_classes} classes: the three solves agree on W to {spread:.1e}")
    checks["solves agree"] = spread <= 1e-12

    report = rv.verify(model, ref, class_names=list(data.class_names), backend="both" if args.onnx else "torch")
    print("3. the Table 1 view (first rows):")
    print(report)
    checks["Table 1 PASS"] = report.ok

    radius = report.radius if report.radius is not None else rv.certified_radius(model, x)
    inside = radius.l2 > 0
    print(f"4. certified L2 radius > 0 at {int(inside.sum())} of {len(x)} digits "
          "(a tie at the probe, e.g. equal values in a max-pool window, gives 0)")
    if inside.any():
        g = torch.Generator().manual_seed(0)
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        step = (0.9 * radius.l2).clamp_max(1e3).view(-1, 1, 1, 1)
        nearby = x.double() + d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * step
        near = rv.verify(model, ref, nearby, radius=False, jacobian=False)
        print(f"   at random points 0.9 r away from each digit: max relative error "
              f"{near.max_rel_error:.1e} (tolerance {near.tolerance:g})  {'PASS' if near.ok else 'FAIL'}")
        checks["exact inside the radius"] = near.ok

    failed = [name for name, ok in checks.items() if not ok]
    print("all checks PASS" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
