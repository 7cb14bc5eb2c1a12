#!/usr/bin/python3
"""A training loop on one StreamGradients stream: the model is sent once, then each step sends a
batch and the SGD update, and the server keeps the parameters in step with ours.

    client/python/generate.sh      # or use a venv with the package installed (README)
    PYTHONPATH=client/python /usr/bin/python3 client/python/examples/train_stream.py --target 127.0.0.1:50051

Learns to classify points of two interleaved spiral arms with a 2-32-32-2 tanh network, printing the
loss and the per-layer gradient norms (the diagnostics) every 50 steps. Needs numpy and grpcio.
The connection flags of example.py (TLS, token) apply through gradserve.client.connect.
"""

import argparse

import numpy as np

from gradserve import client as gc
from gradserve.client import pb


def spirals(n: int, rng: np.random.Generator):
    t = rng.uniform(0.25, 1.5, n) * np.pi
    label = rng.integers(0, 2, n)
    r = t / (1.5 * np.pi)
    angle = t + np.pi * label
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1) + rng.normal(0, 0.02, (n, 2))
    return x.astype(np.float32), label.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1.0)
    args = parser.parse_args()

    widths = [2, 32, 32, 2]
    model = pb.Model(loss=gc.loss("cross_entropy"))
    for i in range(3):
        model.layers.add(name=f"fc{i + 1}").linear.CopyFrom(
            pb.Linear(in_features=widths[i], out_features=widths[i + 1]))
        if i < 2:
            model.layers.add(name=f"tanh{i + 1}").tanh.SetInParent()
    rng = np.random.default_rng(0)
    params = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        bound = 1.0 / np.sqrt(fan_in)  # nn.Linear's default init range
        params.append((rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32),
                       rng.uniform(-bound, bound, fan_out).astype(np.float32)))

    channel = gc.connect(args.target)
    lr = np.float32(args.lr)
    with gc.TrainingStream(channel, model, np.float32, timeout=600) as stream:
        update = None
        for step in range(args.steps):
            x, y = spirals(128, rng)
            answer = (stream.step(x, y, parameters=params) if update is None
                      else stream.step(x, y, update=update))
            update = [(-lr * dw, -lr * db) for dw, db in gc.gradients(answer.result)]
            params = [(w + u, b + v) for (w, b), (u, v) in zip(params, update)]  # our copy
            if step % 50 == 0 or step == args.steps - 1:
                norms = " ".join(f"{d.name}={d.weight_grad_norm:.2e}"
                                 for d in answer.result.diagnostics if d.kind == "linear")
                print(f"step {step:4d}  loss {answer.result.loss:.4f}  |dW| {norms}")


if __name__ == "__main__":
    main()
