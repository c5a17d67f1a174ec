"""Train the bundled digits CNN (reconviz.models.DigitsCNN) on scikit-learn's digits.

Deterministic: fixed split, fixed seed, one thread, deterministic kernels, so
the same torch build on the same CPU writes the same weights. Prints the
held-out test accuracy and writes a state_dict (atomically).

    python examples/train_digits.py                              # -> digits_cnn.pt
    python examples/train_digits.py --out reconviz/models/digits_cnn.pt   # refresh the bundled weights
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
from torch import nn

import reconviz as rv
from reconviz.reconstruction import atomic_write


def train(epochs: int = 40, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> tuple[nn.Module, float]:
    """Adam with a cosine learning rate; returns (model in eval mode, held-out accuracy)."""
    torch.manual_seed(seed)
    data = rv.models.load_data()
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    model = rv.models.DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(data.x_test)).argmax(1)
    return model, float((pred == torch.as_tensor(data.y_test)).double().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_cnn.pt", help="where to write the state_dict")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        model, accuracy = train(args.epochs, args.seed)
    finally:  # process-wide settings: leave them as they were (main() may run inside another program)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write(Path(args.out), lambda f: f.write(buffer.getvalue()))
    n_test = len(rv.models.load_data().y_test)
    print(f"held-out test accuracy: {accuracy:.2%} on {n_test} digits ({args.epochs} epochs, seed {args.seed})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
