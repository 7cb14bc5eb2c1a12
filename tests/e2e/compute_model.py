"""The numpy side of gradclient.sh's `gradclient compute --model` cases, on the committed MLP
(client/examples/models/mlp.*: Linear(4, 16) -> ReLU -> Linear(16, 3)).

    compute_model.py write DIR               the batch and parameters as .npy files: x, y
                                             (float64), x_fortran (x in Fortran order), x32,
                                             y32 (float32), classes (int64),
                                             params/ and params32/ (the state_dict names)
    compute_model.py check OUT PARAMS X Y LOSS TOLERANCE
                                             OUT's gradient files, loss.txt and (if present)
                                             input_gradient.npy against numpy's backward pass
                                             with the parameters in PARAMS (LOSS: mse or
                                             cross_entropy)
    compute_model.py same OUT_A OUT_B        the two directories hold the same files, byte for
                                             byte (.npy and loss.txt)
"""

import sys
from pathlib import Path

import numpy as np

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def write(directory):
    rng = np.random.default_rng(14)
    directory.mkdir(parents=True, exist_ok=True)
    x = rng.standard_normal((8, 4))
    y = rng.standard_normal((8, 3))
    np.save(directory / "x.npy", x)
    np.save(directory / "y.npy", y)
    np.save(directory / "x_fortran.npy", np.asfortranarray(x))
    np.save(directory / "x32.npy", x.astype(np.float32))
    np.save(directory / "y32.npy", y.astype(np.float32))
    np.save(directory / "classes.npy", rng.integers(0, 3, size=8).astype(np.int64))
    shapes = {"0.weight": (16, 4), "0.bias": (16,), "2.weight": (3, 16), "2.bias": (3,)}
    for sub, dtype in (("params", np.float64), ("params32", np.float32)):
        (directory / sub).mkdir(exist_ok=True)
        for name in NAMES:
            np.save(directory / sub / f"{name}.npy",
                    (0.5 * rng.standard_normal(shapes[name])).astype(dtype))


def reference(params, x, y, loss):
    """Loss, gradients and dL/dx of the MLP, in float64."""
    w0, b0, w2, b2 = (params[n].astype(np.float64) for n in NAMES)
    x = x.astype(np.float64)
    h = x @ w0.T + b0
    r = np.maximum(h, 0)
    o = r @ w2.T + b2
    if loss == "mse":
        value = np.mean((o - y) ** 2)
        d_o = 2 * (o - y) / o.size
    else:
        z = o - o.max(axis=1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.arange(len(y))
        value = -np.mean(log_softmax[rows, y])
        d_o = np.exp(log_softmax)
        d_o[rows, y] -= 1
        d_o /= len(y)
    d_h = (d_o @ w2) * (h > 0)
    grads = {"0.weight": d_h.T @ x, "0.bias": d_h.sum(0), "2.weight": d_o.T @ r,
             "2.bias": d_o.sum(0)}
    return value, grads, d_h @ w0


def check(out, params_dir, x_path, y_path, loss, tolerance):
    params = {n: np.load(params_dir / f"{n}.npy") for n in NAMES}
    x, y = np.load(x_path), np.load(y_path)
    want_loss, want, want_dx = reference(params, x, y, loss)
    dtype = params["0.weight"].dtype
    failures = []
    got_loss = float((out / "loss.txt").read_text())
    if abs(got_loss - want_loss) > tolerance * max(abs(want_loss), 1):
        failures.append(f"loss.txt {got_loss!r}, numpy {want_loss!r}")
    files = {n: out / f"{n}.npy" for n in NAMES}
    if (out / "input_gradient.npy").exists():
        files["input_gradient"] = out / "input_gradient.npy"
        want["input_gradient"] = want_dx
    for name, path in files.items():
        if not path.exists():
            failures.append(f"{path} is missing")
            continue
        got = np.load(path)
        if got.dtype != dtype or got.shape != want[name].shape:
            failures.append(f"{path.name}: {got.dtype} {got.shape}, expected {dtype} "
                            f"{want[name].shape}")
            continue
        scale = max(float(np.max(np.abs(want[name]))), 1e-30)
        error = float(np.max(np.abs(got - want[name]))) / scale
        if error > tolerance:
            failures.append(f"{path.name}: relative error {error:.3g} > {tolerance:g}")
    for failure in failures:
        print(f"FAIL {out.name}: {failure}")
    if not failures:
        print(f"ok   {out.name}: {len(files)} .npy files and loss {got_loss!r} within "
              f"{tolerance:g} of numpy's")
    return 1 if failures else 0


def same(a, b):
    def contents(directory):
        return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*")
                if p.is_file() and (p.suffix == ".npy" or p.name == "loss.txt")
                and p.parts[len(directory.parts)] != "params"}
    got_a, got_b = contents(a), contents(b)
    if got_a.keys() != got_b.keys():
        print(f"FAIL {a.name} vs {b.name}: files {sorted(map(str, got_a))} and "
              f"{sorted(map(str, got_b))}")
        return 1
    differ = sorted(str(p) for p in got_a if got_a[p] != got_b[p])
    if differ:
        print(f"FAIL {a.name} vs {b.name}: {differ} differ")
        return 1
    print(f"ok   {a.name} and {b.name}: {len(got_a)} files, byte for byte the same")
    return 0


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "write":
        write(Path(args[0]))
        return 0
    if command == "check":
        out, params, x, y, loss, tolerance = args
        return check(Path(out), Path(params), x, y, loss, float(tolerance))
    return same(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())
