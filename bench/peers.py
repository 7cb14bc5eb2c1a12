#!/usr/bin/python3
"""The engine's peers for bench/run.sh, one thread count per process.

    /usr/bin/python3 bench/peers.py --threads T [--min-time S] [--cases a,b,c,d,e] [--json OUT]

Times one training step (forward, loss, backward with dW, db and dx) of the same float32
networks as bench/engine_bench.cc, with
  torch   torch.nn.Sequential + loss.backward() (grads set to None before each step); for case
          (e), the GPT-2-style decoder, nn.Module blocks written with plain torch ops (class
          Gpt), eager and torch.jit.trace'd, with T > 1 also with torch's own pool at 1 thread
          (OpenBLAS's still at T), the fastest compared (torch 1.13 has no
          scaled_dot_product_attention); no dx (token ids have no gradient)
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
import math
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
parser.add_argument("--cases", default="a,b,c,d,e")
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
import torch.nn.functional as F  # noqa: E402
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


# Case (e): GPT-2-style decoder, tests/engine/graph_test_models.h's GptSpec with
# bench/engine_bench.cc's GptCase(): batch, T, vocabulary, d, heads, blocks.
GPT = dict(batch=8, seq=128, vocab=1024, d=256, heads=4, blocks=4)


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


# --- case (e): GPT-2-style decoder ----------------------------------------------------------

def _splitmix(z):
    """splitmix64's finaliser on a uint64 array (wrapping, as the C++ does)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _keys(tensor, n):
    return (np.uint64(tensor + 1) << np.uint64(32)) | np.arange(n, dtype=np.uint64)


def gpt_parameter_shapes(c=GPT):
    """(name, shape) in GptSpec's parameter order: the state_dict names of class Gpt."""
    d, t, v = c["d"], c["seq"], c["vocab"]
    out = [("wte.weight", (v, d)), ("wpe.weight", (t, d))]
    for layer in range(c["blocks"]):
        p = f"h.{layer}"
        out += [(f"{p}.ln_1.weight", (d,)), (f"{p}.ln_1.bias", (d,)),
                (f"{p}.attn.c_attn.weight", (3 * d, d)), (f"{p}.attn.c_attn.bias", (3 * d,)),
                (f"{p}.attn.c_proj.weight", (d, d)), (f"{p}.attn.c_proj.bias", (d,)),
                (f"{p}.ln_2.weight", (d,)), (f"{p}.ln_2.bias", (d,)),
                (f"{p}.mlp.c_fc.weight", (4 * d, d)), (f"{p}.mlp.c_fc.bias", (4 * d,)),
                (f"{p}.mlp.c_proj.weight", (d, 4 * d)), (f"{p}.mlp.c_proj.bias", (d,))]
    return out + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def gpt_data(c=GPT):
    """The engine bench's numbers (Note [Case (e) data] in bench/engine_bench.cc): parameter t's
    element i is U(-a, a), a = 0.02 sqrt(3), from splitmix64((t + 1) << 32 | i); LayerNorm
    weights 1; ids and targets from tensors 1000 and 1001 modulo the vocabulary."""
    a = 0.02 * np.sqrt(3.0)
    params = {}
    for t, (name, shape) in enumerate(gpt_parameter_shapes(c)):
        n = int(np.prod(shape))
        if "ln" in name and name.endswith(".weight"):
            values = np.ones(n, np.float32)
        else:
            u = (_splitmix(_keys(t, n)) >> np.uint64(40)).astype(np.float64) * 2.0 ** -24
            values = ((2.0 * u - 1.0) * a).astype(np.float32)
        params[name] = values.reshape(shape)
    tokens = c["batch"] * c["seq"]
    shape = (c["batch"], c["seq"])
    ids = (_splitmix(_keys(1000, tokens)) % np.uint64(c["vocab"])).astype(np.int64).reshape(shape)
    targets = (_splitmix(_keys(1001, tokens)) % np.uint64(c["vocab"])).astype(np.int64)
    return params, ids, targets.reshape(shape)


class GptAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, t = c["d"], c["seq"]
        self.heads = c["heads"]
        self.scale = 1.0 / math.sqrt(d // c["heads"])  # A constant, not traced arithmetic.
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("causal", torch.tril(torch.ones(t, t, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.c_attn(x).split(d, dim=2)
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k = k.view(b, t, self.heads, hd).transpose(1, 2)
        v = v.view(b, t, self.heads, hd).transpose(1, 2)
        # The fastest plain-ops attention in torch 1.13 on this CPU (baddbmm with an additive
        # mask, which folds the scale and mask into the product, measured slower).
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = F.softmax(att.masked_fill(~self.causal[:t, :t], float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class GptMlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c["d"], 4 * c["d"])
        self.c_proj = nn.Linear(4 * c["d"], c["d"])

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GptBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c["d"])
        self.attn = GptAttention(c)
        self.ln_2 = nn.LayerNorm(c["d"])
        self.mlp = GptMlp(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    """GPT-2 as GptSpec builds it: token + position embeddings, pre-norm blocks, ln_f, an LM
    head tied to wte, mean cross-entropy with ignore_index -1; forward returns the loss."""

    def __init__(self, c=GPT):
        super().__init__()
        self.vocab = c["vocab"]
        self.wte = nn.Embedding(c["vocab"], c["d"])
        self.wpe = nn.Embedding(c["seq"], c["d"])
        self.h = nn.ModuleList([GptBlock(c) for _ in range(c["blocks"])])
        self.ln_f = nn.LayerNorm(c["d"])
        self.register_buffer("positions", torch.arange(c["seq"]), persistent=False)

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe(self.positions[:ids.shape[1]])
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1),
                               ignore_index=-1)


class GptCase:
    """Case (e): Gpt at the engine bench's weights, run eager and as torch.jit.trace'd."""

    def __init__(self):
        c = GPT
        params, ids, targets = gpt_data(c)
        self.model = Gpt(c)
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        self.ids, self.targets = torch.from_numpy(ids), torch.from_numpy(targets)
        self.params = list(self.model.parameters())
        self.traced = torch.jit.trace(self.model, (self.ids, self.targets), check_trace=False)
        # Nominal: 6 * tokens * (matmul parameters) + attention's two batched products (x3 for
        # forward + backward); the engine's counter is its plan's FLOPs.
        tokens = c["batch"] * c["seq"]
        d = c["d"]
        linear = c["blocks"] * (12 * d * d) + c["vocab"] * d
        attention = c["blocks"] * 2 * 2 * tokens * c["seq"] * d
        self.flops = 6.0 * tokens * linear + 3.0 * attention

    def step(self, variant="eager"):
        for p in self.params:
            p.grad = None
        loss = (self.traced if variant == "jit" else self.model)(self.ids, self.targets)
        loss.backward()
        return loss

    def loss_and_grad_norm(self):
        loss = float(self.step())
        return loss, math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in self.params))


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
        if name == "e":
            gpt = GptCase()
            entry = {"flops": gpt.flops, "torch_variants": {}}
            entry["loss"], entry["grad_norm"] = gpt.loss_and_grad_norm()
            # With T threads, OpenBLAS's pool has T; torch's own (OpenMP) pool runs the
            # element-wise ops with T or with 1 thread: waking a passive OpenMP team for each of
            # the step's many small ops can cost more than it saves, so both are timed.
            for intra in sorted({args.threads, 1}, reverse=True):
                torch.set_num_threads(intra)
                for mode in ("eager", "jit"):
                    variant = mode if intra == args.threads else f"{mode}, intra-op 1"
                    # The profiling executor specialises a traced graph over its first runs.
                    for _ in range(2):
                        gpt.step(mode)
                    entry["torch_variants"][variant] = timed(lambda m=mode: gpt.step(m),
                                                             args.min_time)
            torch.set_num_threads(args.threads)
            best = min(entry["torch_variants"], key=lambda v: entry["torch_variants"][v][0])
            entry["torch_variant"] = best
            entry["torch_s"], entry["torch_reps"] = entry["torch_variants"][best]
            result["cases"][name] = entry
            print(f"peers threads={args.threads} e: torch {entry['torch_s'] * 1e3:.1f} ms "
                  f"({best}; " + ", ".join(f"{v} {t * 1e3:.1f} ms" for v, (t, _) in
                                           entry["torch_variants"].items()) +
                  f"), loss {entry['loss']:.7f}", file=sys.stderr)
            continue
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
