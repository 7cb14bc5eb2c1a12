#!/usr/bin/env python3
"""The engine's peers for bench/run.sh, one thread count per process.

    /usr/bin/python3 bench/peers.py --threads T [--min-time S] [--cases a,b,c,d] [--json OUT]

Times one training step (forward, loss, backward with dW, db and dx) of the same float32
networks as bench/engine_bench.cc, with
  torch   torch.nn.Sequential + loss.backward() (grads set to None before each step)
  numpy   the textbook manual backprop: forward matmuls, then delta -> dW = delta^T a,
          db = sum(delta), delta <- delta W, element-wise derivatives from the saved outputs
  ckpt    (case d) torch checkpointing as torch.utils.checkpoint.checkpoint_sequential does it,
          8 segments, use_reentrant=False; plus the activation bytes held after the forward
          pass, with and without it (saved_tensors_hooks, distinct storages, parameters,
          inputs and targets excluded; plus the segment inputs checkpoint keeps)
  sgemm   numpy (OpenBLAS or whatever libblas.so.3 is) and torch.mm on 1024^3 float32
and reports which BLAS library and kernel each uses (threadpoolctl). Thread counts are set
before numpy/torch load: OPENBLAS_NUM_THREADS=T, OMP_NUM_THREADS=T, OMP_WAIT_POLICY=PASSIVE,
then torch.set_num_threads(T) (Debian's torch does not pass it on to OpenBLAS, so without
OPENBLAS_NUM_THREADS the two pools oversubscribe the cores). Each figure is the median of
at least 3 timed steps after one warm-up step, timed for at least --min-time seconds.
"""

import argparse
import json
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
parser.add_argument("--cases", default="a,b,c,d")
parser.add_argument("--json", help="write the results here (default: stdout)")
parser.add_argument("--check", action="store_true",
                    help="also check numpy's gradients against torch's (once per run is enough)")
args = parser.parse_args()

# Thread settings must be in the environment before the BLAS and OpenMP libraries load.
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

try:
    import threadpoolctl  # noqa: E402
except ImportError:  # deploy/install-deps.sh --bench installs it
    threadpoolctl = None

torch.set_num_threads(args.threads)
torch.manual_seed(0)

# name: (batch, widths, activation after each Linear but maybe the last, act after last, loss)
CASES = {
    "a": (8, [4, 2], None, False, "mse"),
    "b": (256, [784, 1024, 1024, 10], "relu", False, "ce"),
    "c": (1024, [1024] * 9, "relu", True, "mse"),
    "d": (128, [256] * 65, "tanh", True, "mse"),
}


def nominal_flops(batch, widths):
    return 6.0 * batch * sum(i * o for i, o in zip(widths[:-1], widths[1:]))


def timed(fn, min_time, min_reps=3):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


class Net:
    """One case's data and parameters, shared by the torch and numpy versions."""

    def __init__(self, name, dtype=np.float32):
        batch, widths, act, act_last, loss = CASES[name]
        self.name, self.batch, self.widths, self.act, self.loss = name, batch, widths, act, loss
        self.flops = nominal_flops(batch, widths)
        rng = np.random.default_rng(7)
        n = len(widths) - 1
        self.acts = [act if (i + 1 < n or act_last) else None for i in range(n)]
        self.W = [(rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)
                  for i, o in zip(widths[:-1], widths[1:])]
        self.b = [(0.1 * rng.standard_normal(o)).astype(dtype) for o in widths[1:]]
        self.x = rng.standard_normal((batch, widths[0])).astype(dtype)
        if loss == "ce":
            self.y = rng.integers(0, widths[-1], batch)
        else:
            self.y = rng.standard_normal((batch, widths[-1])).astype(dtype)

        layers = []
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            lin = nn.Linear(W.shape[1], W.shape[0], dtype=torch.from_numpy(W).dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W))
                lin.bias.copy_(torch.from_numpy(b))
            layers.append(lin)
            if self.acts[i] == "relu":
                layers.append(nn.ReLU())
            elif self.acts[i] == "tanh":
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)
        self.linears = [m for m in layers if isinstance(m, nn.Linear)]
        self.params = list(self.model.parameters())
        self.tx = torch.from_numpy(self.x.copy()).requires_grad_(True)
        self.ty = torch.from_numpy(self.y.copy())
        self.loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()

    # --- torch -----------------------------------------------------------------------------
    def torch_step(self):
        for p in self.params:
            p.grad = None
        self.tx.grad = None
        loss = self.loss_fn(self.model(self.tx), self.ty)
        loss.backward()
        return loss

    def ckpt_forward(self, segments=8):
        """torch.utils.checkpoint.checkpoint_sequential's loop, with use_reentrant=False.

        Returns the output and the segment inputs checkpoint holds on to."""
        functions = list(self.model.children())

        def run_function(start, end):
            def forward(inp):
                for j in range(start, end + 1):
                    inp = functions[j](inp)
                return inp
            return forward

        segment_size = len(functions) // segments
        end = -1
        held = []
        inp = self.tx
        for start in range(0, segment_size * (segments - 1), segment_size):
            end = start + segment_size - 1
            inp = checkpoint(run_function(start, end), inp, use_reentrant=False)
            held.append(inp)
        return run_function(end + 1, len(functions) - 1)(inp), held

    def ckpt_step(self):
        for p in self.params:
            p.grad = None
        self.tx.grad = None
        out, _ = self.ckpt_forward()
        loss = self.loss_fn(out, self.ty)
        loss.backward()
        return loss

    def held_bytes(self, checkpointed):
        """Bytes of distinct activation storages autograd holds after the forward pass."""
        excluded = {_storage_ptr(t) for t in self.params + [self.tx, self.ty]}
        seen = {}

        def pack(t):
            ptr = _storage_ptr(t)
            if ptr not in excluded:
                seen[ptr] = _storage_bytes(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if checkpointed:
                out, held = self.ckpt_forward()
                for t in held:
                    if _storage_ptr(t) not in excluded:
                        seen[_storage_ptr(t)] = _storage_bytes(t)
            else:
                out = self.model(self.tx)
            loss = self.loss_fn(out, self.ty)
        total = sum(seen.values())
        loss.backward()
        return total

    # --- numpy -----------------------------------------------------------------------------
    def numpy_step(self):
        W, b = self.W, self.b
        inputs, outputs = [], []
        a = self.x
        for i in range(len(W)):
            inputs.append(a)
            z = a @ W[i].T
            z += b[i]
            if self.acts[i] == "relu":
                z = np.maximum(z, 0)
            elif self.acts[i] == "tanh":
                z = np.tanh(z)
            outputs.append(z)
            a = z
        if self.loss == "ce":
            m = a - a.max(axis=1, keepdims=True)
            e = np.exp(m)
            p = e / e.sum(axis=1, keepdims=True)
            rows = np.arange(self.batch)
            loss = -np.mean(np.log(p[rows, self.y]))
            delta = p
            delta[rows, self.y] -= 1
            delta /= self.batch
        else:
            diff = a - self.y
            loss = np.mean(diff * diff)
            delta = diff * (2.0 / diff.size)
        dW, db = [None] * len(W), [None] * len(W)
        for i in reversed(range(len(W))):
            if self.acts[i] == "relu":
                delta = delta * (outputs[i] > 0)
            elif self.acts[i] == "tanh":
                delta = delta * (1 - outputs[i] * outputs[i])
            dW[i] = delta.T @ inputs[i]
            db[i] = delta.sum(axis=0)
            delta = delta @ W[i]  # dx at i == 0
        return loss, dW, db, delta


def _storage_ptr(t):
    s = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
    return s.data_ptr()


def _storage_bytes(t):
    s = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
    return s.nbytes()


def check(name):
    """numpy's gradients against torch's, both in float64: a wrong manual backprop would make a
    fast peer. (In float32, ReLU masks of pre-activations within rounding of 0 differ between
    the two, which moves lower layers' gradients by up to ~1e-2 relative in case c.)"""
    net = Net(name, np.float64)
    loss_t = net.torch_step()
    loss_n, dW, db, dx = net.numpy_step()
    worst = abs(float(loss_t) - float(loss_n)) / max(abs(float(loss_t)), 1e-30)
    pairs = [(dW[i], lin.weight.grad) for i, lin in enumerate(net.linears)]
    pairs += [(db[i], lin.bias.grad) for i, lin in enumerate(net.linears)]
    pairs += [(dx, net.tx.grad)]
    for mine, ref in pairs:
        ref = ref.numpy()
        worst = max(worst, float(np.abs(mine - ref).max() / max(np.abs(ref).max(), 1e-30)))
    return worst


def sgemm(n=1024, min_time=0.5):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    t_np, _ = timed(lambda: a @ b, min_time)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_torch, _ = timed(lambda: torch.mm(ta, tb), min_time)
    return {"n": n, "numpy_s": t_np, "numpy_gflops": 2 * n ** 3 / t_np * 1e-9,
            "torch_s": t_torch, "torch_gflops": 2 * n ** 3 / t_torch * 1e-9}


def blas_info():
    if threadpoolctl is None:
        return [{"error": "threadpoolctl not installed (deploy/install-deps.sh --bench)"}]
    keep = ("internal_api", "prefix", "version", "architecture", "threading_layer",
            "num_threads", "filepath")
    return [{k: lib.get(k) for k in keep if lib.get(k) is not None}
            for lib in threadpoolctl.threadpool_info()]


def main():
    result = {
        "threads": args.threads,
        "env": {k: os.environ.get(k) for k in
                ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                 "OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cases": {},
    }
    result["sgemm"] = sgemm(min_time=min(args.min_time, 0.5))
    for name in args.cases.split(","):
        net = Net(name)
        entry = {"flops": net.flops}
        if args.check:
            entry["numpy_vs_torch_max_rel_err_f64"] = check(name)
        entry["torch_s"], entry["torch_reps"] = timed(net.torch_step, args.min_time)
        entry["numpy_s"], entry["numpy_reps"] = timed(net.numpy_step, args.min_time)
        if name == "d":
            entry["ckpt_s"], entry["ckpt_reps"] = timed(net.ckpt_step, args.min_time)
            entry["ckpt_held_bytes"] = net.held_bytes(True)
            entry["none_held_bytes"] = net.held_bytes(False)
            entry["ckpt_method"] = (
                "checkpoint_sequential's loop (8 segments) with "
                "torch.utils.checkpoint.checkpoint(use_reentrant=False)")
        result["cases"][name] = entry
        print(f"peers threads={args.threads} {name}: torch {entry['torch_s'] * 1e3:.3f} ms, "
              f"numpy {entry['numpy_s'] * 1e3:.3f} ms", file=sys.stderr)
    result["blas"] = blas_info()  # After the BLAS has run, so lazily loaded libraries show.
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
