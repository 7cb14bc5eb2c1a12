#!/usr/bin/python3
"""Acceptance check: gradserve's gradients agree with PyTorch autograd.

    /usr/bin/python3 bench/pytorch_crosscheck.py --target 127.0.0.1:PORT [--rounds 3] [--seed 0]
        [--only all|chain|graph|onnx] [--quiet]

Starts nothing: point it at a running server. For seeded random MLPs covering every layer kind
(Linear with and without bias, ReLU, LeakyReLU at several slopes, Sigmoid, Tanh, GELU exact and
tanh, Identity), every loss (MSE, L1, Huber at several deltas, cross-entropy with INT64 and
INT32 targets, BCE-with-logits, and the external loss, i.e. a caller-supplied output
gradient), both reductions plus the unset default, float64 and float32 and assorted batch
sizes, it builds the same torch.nn.Sequential, runs loss.backward() and compares the loss and
every dW, db and dx.

Error metric, per tensor: max|server - torch| / max(max|torch|, tiny) with tiny the smallest
normal float64; the loss uses |server - torch| / max(|torch|, tiny). A case's error is the
largest over its tensors. Thresholds: float64 <= 1e-9, float32 <= 1e-4. The reference is
torch in the request's own dtype, on exactly the same input bits.

Also checks that every checkpointing mode (SQRT, EVERY_K, MEMORY_BUDGET) returns results
bit-identical to MODE_NONE, as the API promises, and probes the derivative conventions at
kinks (exact zeros into ReLU/LeakyReLU, L1 at output == target), where PyTorch's choice is
the reference.

Graph models (--only graph runs just these): a pre-norm residual LayerNorm MLP (MSE and
cross-entropy, with dL/dx) and a GPT-2-style decoder (2 blocks, 4 heads, tied LM head,
cross-entropy over [B, T, V] with ignored positions, T equal to and below the block size),
defined as ordinary torch.nn modules in client/python/examples/torch_models.py and turned into requests
by client/python/gradserve/graph.py (torch.fx). Compared tensor by tensor: the loss, the
output, every gradient by state_dict key, dL/dx. There the per-tensor error has a floor:
max|server - torch| / max(max|torch|, 1e-6 * G), G the largest |torch gradient| entry of the
case (see GRAPH_FLOOR), and the thresholds are the same. Also: the traced graph run forward in
numpy (client/python/tests/graph_numpy.py) against torch, every checkpoint mode bit-identical on the
GPT, and the tracer's refusals (unsupported module, mask computed on the server, training-mode
Dropout without a seed).

ONNX models (--only onnx runs just these): the modules of tests/data/onnx/export_models.py
(every activation, residual LayerNorm MLP at opsets 17 and 13, a decoder on
nn.MultiheadAttention, nanoGPT with a tied head) exported afresh by gradserve.onnx.from_torch
with new random batches (several batch sizes, and sequence lengths below the export's), in
float64 and float32, compared with autograd tensor by tensor (same metric and floor as the graph
models). Exit status 1 if anything fails.
"""

import argparse
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import grpc
import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
# A private, complete copy of the package with freshly generated stubs: whatever is installed
# or left in the checkout, this checks the tree's own client.
_package_dir = tempfile.mkdtemp(prefix="gradserve-py-")
subprocess.run([str(REPO / "client" / "python" / "generate.sh"), _package_dir], check=True,
               stdout=subprocess.DEVNULL)
sys.path[:0] = [_package_dir, str(REPO / "client" / "python" / "tests"),
                str(REPO / "client" / "python" / "examples")]
from gradserve import client as gc  # noqa: E402
from gradserve import graph as gg  # noqa: E402  (after the stubs are on sys.path)
from gradserve import onnx as gradserve_onnx  # noqa: E402
import graph_numpy  # noqa: E402
import torch_models  # noqa: E402
pb = gc.pb

THRESHOLD = {np.float64: 1e-9, np.float32: 1e-4}
TINY = np.finfo(np.float64).tiny
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
DTYPE_NAME = {np.float64: "float64", np.float32: "float32"}

# Activation factories. Every kind appears in every round (the list is cycled through), and
# LeakyReLU covers PyTorch's default, zero, a steep and a negative slope.
ACTIVATIONS: List[Callable[[], nn.Module]] = [
    nn.ReLU,
    nn.LeakyReLU,                      # default 0.01; also sent with the field unset
    lambda: nn.LeakyReLU(0.2),
    lambda: nn.LeakyReLU(0.0),
    lambda: nn.LeakyReLU(-0.5),
    nn.Sigmoid,
    nn.Tanh,
    lambda: nn.GELU(approximate="none"),
    lambda: nn.GELU(approximate="tanh"),
    nn.Identity,
]

# (label, Loss.kind, huber delta or None, class-target numpy dtype or None)
LOSSES = [
    ("mse", "mse", None, None),
    ("l1", "l1", None, None),
    ("huber(d=unset)", "huber", None, None),
    ("huber(d=0.3)", "huber", 0.3, None),
    ("huber(d=2.5)", "huber", 2.5, None),
    ("ce(int64)", "cross_entropy", None, np.int64),
    ("ce(int32)", "cross_entropy", None, np.int32),
    ("bce_logits", "bce_with_logits", None, None),
    ("external", "external", None, None),
]
# None leaves Loss.reduction unset, which the API defines as MEAN.
REDUCTIONS = ["mean", "sum", None]
BATCHES = [1, 2, 3, 8, 17, 64, 200, 1000]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    if want.size == 0:
        return 0.0
    diff = np.max(np.abs(got - want))
    if not np.isfinite(diff):
        return math.inf
    return float(diff / max(np.max(np.abs(want)), TINY))


@dataclass
class Case:
    """One model + batch + loss, with everything needed to replay it on both sides."""
    name: str
    dtype: type
    loss_label: str
    loss_kind: str
    reduction: Optional[str]
    model: nn.Sequential
    x: np.ndarray
    targets: Optional[np.ndarray] = None        # class indices keep their integer dtype
    output_gradient: Optional[np.ndarray] = None
    huber_delta: Optional[float] = None
    class_dtype: Optional[type] = None          # INT32/INT64 for cross-entropy targets
    send_defaults_unset: bool = False           # clear fields whose proto default is meant

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def arch(self) -> str:
        parts = []
        for m in self.model:
            if isinstance(m, nn.Linear):
                parts.append(f"L{m.in_features}x{m.out_features}" + ("" if m.bias is not None
                                                                   else "nb"))
            elif isinstance(m, nn.LeakyReLU):
                parts.append(f"lrelu{m.negative_slope:g}")
            elif isinstance(m, nn.GELU):
                parts.append("gelu" if m.approximate == "none" else "gelu_t")
            else:
                parts.append(type(m).__name__.lower())
        return " ".join(parts)


def request_for(case: Case, checkpoint=None) -> "pb.ComputeGradientsRequest":
    request = gc.request_from_sequential(
        case.model, case.loss_kind, case.x,
        targets=case.targets, output_gradient=case.output_gradient,
        reduction=case.reduction, huber_delta=case.huber_delta,
        dtype=case.dtype, return_input_gradient=True, checkpoint=checkpoint)
    if case.send_defaults_unset:
        # The helper always writes these explicitly; clearing them checks the documented
        # defaults (bias unset = true, negative_slope unset = 0.01).
        for layer, module in zip(request.model.layers, case.model):
            if layer.HasField("linear") and module.bias is not None:
                layer.linear.ClearField("bias")
            if layer.HasField("leaky_relu") and module.negative_slope == 0.01:
                layer.leaky_relu.ClearField("negative_slope")
    return request


def torch_reference(case: Case) -> dict:
    """Loss and gradients from PyTorch autograd, in the case's dtype."""
    model = case.model
    model.zero_grad(set_to_none=True)
    x = torch.from_numpy(case.x.copy()).requires_grad_(True)
    out = model(x)
    reduction = case.reduction or "mean"
    if case.loss_kind == "external":
        out.backward(torch.from_numpy(case.output_gradient.copy()))
        loss_value = 0.0
    else:
        if case.loss_kind == "cross_entropy":
            # torch wants int64 class indices; the server gets the original INT32/INT64.
            target = torch.from_numpy(case.targets.astype(np.int64))
            criterion = nn.CrossEntropyLoss(reduction=reduction)
        else:
            target = torch.from_numpy(case.targets.copy())
            criterion = {
                "mse": lambda: nn.MSELoss(reduction=reduction),
                "l1": lambda: nn.L1Loss(reduction=reduction),
                "huber": lambda: nn.HuberLoss(reduction=reduction,
                                              delta=case.huber_delta or 1.0),
                "bce_with_logits": lambda: nn.BCEWithLogitsLoss(reduction=reduction),
            }[case.loss_kind]()
        loss = criterion(out, target)
        loss.backward()
        loss_value = loss.item()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return {
        "loss": loss_value,
        "grads": [(m.weight.grad.numpy().copy(),
                   None if m.bias is None else m.bias.grad.numpy().copy()) for m in linears],
        "dx": x.grad.numpy().copy(),
    }


def compare(case: Case, response, ref: dict) -> dict:
    """Per-tensor relative errors, keyed by a readable tensor name."""
    errors = {"loss": (0.0 if ref["loss"] == 0.0 and response.loss == 0.0
                       else rel_err(response.loss, ref["loss"]))}
    got = gc.gradients(response)
    if len(got) != len(ref["grads"]):
        errors["gradients.size"] = math.inf
        return errors
    for i, ((dw, db), (rw, rb)) in enumerate(zip(got, ref["grads"])):
        errors[f"dW{i}"] = rel_err(dw, rw)
        if (db is None) != (rb is None):
            errors[f"db{i}.presence"] = math.inf
        elif rb is not None:
            errors[f"db{i}"] = rel_err(db, rb)
    errors["dx"] = rel_err(gc.from_tensor(response.input_gradient), ref["dx"])
    return errors


def random_targets(case: Case, rng: np.random.Generator, out_width: int, scale: float):
    if case.loss_kind == "cross_entropy":
        case.targets = rng.integers(0, out_width, case.batch).astype(case.class_dtype)
    elif case.loss_kind == "bce_with_logits":
        t = rng.uniform(0.0, 1.0, (case.batch, out_width))
        # Hard labels too: the common case, and the ends of the stable formula.
        t[rng.random(t.shape) < 0.3] = 0.0
        t[rng.random(t.shape) < 0.3] = 1.0
        case.targets = t.astype(case.dtype)
    elif case.loss_kind == "external":
        case.output_gradient = rng.standard_normal((case.batch, out_width)).astype(case.dtype)
    else:
        # Huber: scale targets with delta so residuals land on both sides of it.
        s = scale * (case.huber_delta or 1.0) * 1.5 if case.loss_kind == "huber" else scale
        case.targets = (s * rng.standard_normal((case.batch, out_width))).astype(case.dtype)


def random_mlp(rng: np.random.Generator, act_cycle: List[int], n_in: int, n_out: int,
               n_linear: int, dtype) -> nn.Sequential:
    """Linear layers of random widths, 0-2 activations between them (and sometimes before the
    first or after the last), drawn in turn from ACTIVATIONS so every kind is used."""
    def next_activation():
        act_cycle[0] += 1
        return ACTIVATIONS[act_cycle[0] % len(ACTIVATIONS)]()

    widths = [n_in] + [int(rng.integers(1, 13)) for _ in range(n_linear - 1)] + [n_out]
    layers: List[nn.Module] = []
    if rng.random() < 0.2:
        layers.append(next_activation())
    for i in range(n_linear):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bool(rng.random() > 0.25)))
        last = i == n_linear - 1
        count = int(rng.integers(0, 2)) if last else int(rng.integers(1, 3))
        layers.extend(next_activation() for _ in range(count))
    model = nn.Sequential(*layers).to(TORCH_DTYPE[dtype])
    # A random gain per layer moves pre-activations out of the near-linear region around 0,
    # where sigmoid/tanh/GELU mistakes would hide.
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(float(rng.uniform(0.7, 2.5)))
                if m.bias is not None:
                    m.bias.mul_(float(rng.uniform(0.5, 2.0)))
    return model


def make_cases(rounds: int, seed: int) -> List[Case]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    act_cycle = [0]
    cases = []
    for r in range(rounds):
        for dtype in (np.float64, np.float32):
            for label, kind, delta, class_dtype in LOSSES:
                for reduction in REDUCTIONS:
                    n_in = int(rng.integers(1, 10))
                    n_out = int(rng.integers(2, 8)) if kind == "cross_entropy" \
                        else int(rng.integers(1, 8))
                    batch = int(rng.choice(BATCHES))
                    model = random_mlp(rng, act_cycle, n_in, n_out, int(rng.integers(1, 5)),
                                       dtype)
                    scale = float(rng.choice([0.5, 1.0, 3.0]))
                    x = (scale * rng.standard_normal((batch, n_in))).astype(dtype)
                    case = Case(name=f"r{r}", dtype=dtype, loss_label=label, loss_kind=kind,
                                reduction=reduction, model=model, x=x, class_dtype=class_dtype,
                                huber_delta=delta, send_defaults_unset=bool(rng.random() < 0.3))
                    random_targets(case, rng, n_out, scale)
                    cases.append(case)
    # A model with no Linear at all: no parameters, only dx (the API allows it).
    for dtype in (np.float64, np.float32):
        x = rng.standard_normal((5, 4)).astype(dtype)
        model = nn.Sequential(nn.Tanh(), nn.GELU()).to(TORCH_DTYPE[dtype])
        case = Case(name="no-linear", dtype=dtype, loss_label="mse", loss_kind="mse",
                    reduction="sum", model=model, x=x)
        random_targets(case, rng, 4, 1.0)
        cases.append(case)
    return cases


def kink_cases() -> List[Case]:
    """Exact ties, where the derivative is a convention: PyTorch's is the reference.

    Zero weight rows and zero bias entries make some pre-activations exactly 0.0 on both
    sides (ReLU'(0) = 0 and LeakyReLU'(0) = slope in PyTorch); a last Linear with zero weight
    makes the output exactly its bias, so L1 targets equal to it give output == target
    (gradient 0 in PyTorch and, per the API, in gradserve).
    """
    cases = []
    rng = np.random.default_rng(1234)
    for dtype in (np.float64, np.float32):
        for act_name, act in (("relu", nn.ReLU), ("lrelu0.2", lambda: nn.LeakyReLU(0.2))):
            fc1, fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
            with torch.no_grad():
                fc1.weight[::2] = 0.0   # rows 0, 2, 4: z = bias ...
                fc1.bias[::2] = 0.0     # ... = exactly 0 for every example
            model = nn.Sequential(fc1, act(), fc2).to(TORCH_DTYPE[dtype])
            x = rng.standard_normal((8, 4)).astype(dtype)
            t = rng.standard_normal((8, 3)).astype(dtype)
            cases.append(Case(name=f"kink-{act_name}@0", dtype=dtype, loss_label="mse",
                              loss_kind="mse", reduction="mean", model=model, x=x, targets=t))
        fc1, fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        with torch.no_grad():
            fc2.weight.zero_()
        model = nn.Sequential(fc1, nn.Tanh(), fc2).to(TORCH_DTYPE[dtype])
        x = rng.standard_normal((6, 4)).astype(dtype)
        t = rng.standard_normal((6, 3)).astype(dtype)
        t[::2] = fc2.bias.detach().numpy()  # even rows: output == target exactly
        cases.append(Case(name="kink-l1@tie", dtype=dtype, loss_label="l1", loss_kind="l1",
                          reduction="sum", model=model, x=x, targets=t))
    return cases


def stress_cases(seed: int) -> List[Case]:
    """Beyond the small random nets: wide layers and big batches (blocked matrix products,
    long reductions, OpenMP splits), saturating inputs (|pre-activation| in the hundreds,
    where naive sigmoid/softmax/log(1+exp) overflow), and single-class cross-entropy."""
    rng = np.random.default_rng(seed + 2)
    torch.manual_seed(seed + 2)
    cases = []
    for dtype in (np.float64, np.float32):
        for label, kind, delta, class_dtype in (LOSSES[0], LOSSES[4], LOSSES[5], LOSSES[7],
                                                LOSSES[8]):
            for reduction in ("mean", "sum"):
                model = nn.Sequential(
                    nn.Linear(96, 256), nn.GELU(approximate="tanh"), nn.Linear(256, 128),
                    nn.LeakyReLU(0.1), nn.Linear(128, 160, bias=False), nn.Tanh(),
                    nn.Linear(160, 10)).to(TORCH_DTYPE[dtype])
                x = rng.standard_normal((512, 96)).astype(dtype)
                case = Case(name="wide", dtype=dtype, loss_label=label, loss_kind=kind,
                            reduction=reduction, model=model, x=x, class_dtype=class_dtype,
                            huber_delta=delta)
                random_targets(case, rng, 10, 1.0)
                cases.append(case)
        # Pre-activations of order +-300: every activation and the two logit losses at the
        # far ends of their range.
        for act in ACTIVATIONS:
            for label, kind, delta, class_dtype in (LOSSES[5], LOSSES[7]):
                model = nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 4)).to(
                    TORCH_DTYPE[dtype])
                with torch.no_grad():
                    for m in model:
                        if isinstance(m, nn.Linear):
                            m.weight.mul_(60.0)
                x = (5.0 * rng.standard_normal((16, 3))).astype(dtype)
                case = Case(name="saturate", dtype=dtype, loss_label=label, loss_kind=kind,
                            reduction="mean", model=model, x=x, class_dtype=class_dtype)
                random_targets(case, rng, 4, 1.0)
                cases.append(case)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(TORCH_DTYPE[dtype])
        case = Case(name="ce-1class", dtype=dtype, loss_label="ce(int64)",
                    loss_kind="cross_entropy", reduction="mean", model=model,
                    x=rng.standard_normal((5, 4)).astype(dtype), class_dtype=np.int64)
        random_targets(case, rng, 1, 1.0)
        cases.append(case)
    return cases


def checkpoint_cases(seed: int) -> List[Case]:
    """Deeper nets, where checkpointing has segments to recompute."""
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed + 1)
    act_cycle = [3]
    cases = []
    for dtype, (label, kind, delta, class_dtype), n_linear, batch in (
            (np.float64, LOSSES[0], 6, 32),
            (np.float32, LOSSES[5], 8, 64),
            (np.float64, LOSSES[3], 5, 7),
            (np.float32, LOSSES[8], 7, 16),
            (np.float64, LOSSES[7], 9, 128)):
        n_in = int(rng.integers(2, 10))
        n_out = int(rng.integers(2, 6))
        model = random_mlp(rng, act_cycle, n_in, n_out, n_linear, dtype)
        x = rng.standard_normal((batch, n_in)).astype(dtype)
        case = Case(name="ckpt", dtype=dtype, loss_label=label, loss_kind=kind,
                    reduction="mean", model=model, x=x, class_dtype=class_dtype, huber_delta=delta)
        random_targets(case, rng, n_out, 1.0)
        cases.append(case)
    return cases



# --- Graph models ------------------------------------------------------------------------------
#
# A residual LayerNorm MLP and a GPT-2-style decoder (client/python/examples/torch_models.py), turned
# into requests by gradserve.graph.from_module (torch.fx), compared tensor by tensor with
# torch autograd: the loss, the output, every gradient by state_dict key (the tied LM head and
# token embedding under both keys) and dL/dx where the input is floating.
#
# Error metric, per tensor: max|server - torch| / max(max|torch|, floor), floor = 1e-6 * G with
# G the largest |torch gradient| entry of the case. The floor keeps a tensor whose exact
# gradient is (close to) zero from being judged on rounding noise alone: the key bias of an
# attention layer, for one, has an exact gradient of 0 (softmax ignores a score shift shared by
# all keys), and both sides return noise of order 1e-17 * G there. The loss uses
# |server - torch| / max(|torch|, tiny). Same thresholds as the chain cases.

GRAPH_FLOOR = 1e-6


@dataclass
class GraphCase:
    name: str
    dtype: type
    module: nn.Module
    inputs: np.ndarray
    targets: np.ndarray
    loss: str
    ignore_index: Optional[int] = None
    input_gradients: tuple = ()

    def describe(self) -> str:
        return f"{self.name} {DTYPE_NAME[self.dtype]} {self.loss} inputs{list(self.inputs.shape)}"


def graph_cases(seed: int) -> List[GraphCase]:
    rng = np.random.default_rng(seed + 3)
    cases = []
    for dtype in (np.float64, np.float32):
        torch.manual_seed(seed + 3)
        mlp = torch_models.ResidualMLP(n_in=6, d=16, hidden=48, n_out=5, blocks=3)
        with torch.no_grad():  # LayerNorm affine terms away from (1, 0), so their use shows
            for name, p in mlp.named_parameters():
                if ".ln" in name or name.startswith("ln_f"):
                    p.add_(0.3 * torch.randn_like(p))
        mlp = mlp.to(TORCH_DTYPE[dtype])
        x = rng.standard_normal((24, 6)).astype(dtype)
        cases.append(GraphCase("resmlp-mse", dtype, mlp, x,
                               rng.standard_normal((24, 5)).astype(dtype), "mse",
                               input_gradients=("x",)))
        cases.append(GraphCase("resmlp-ce", dtype, mlp, x,
                               rng.integers(0, 5, 24).astype(np.int64), "cross_entropy",
                               input_gradients=("x",)))
        torch.manual_seed(seed + 4)
        gpt = torch_models.GPT(vocab_size=29, block_size=16, n_layer=2, n_head=4, n_embd=32)
        with torch.no_grad():  # beyond GPT-2's small init, so every term of the gradient counts
            for name, p in gpt.named_parameters():
                p.add_(0.05 * torch.randn_like(p))
        gpt = gpt.to(TORCH_DTYPE[dtype]).eval()
        for batch, seq in ((4, 16), (3, 11)):  # T = block_size, and T < block_size
            ids = rng.integers(0, 29, (batch, seq)).astype(np.int64)
            targets = rng.integers(0, 29, (batch, seq)).astype(np.int64)
            targets[0, :3] = -1  # ignored positions
            cases.append(GraphCase(f"gpt2-{batch}x{seq}", dtype, gpt, ids, targets,
                                   "cross_entropy", ignore_index=-1))
    return cases


def graph_reference(case: GraphCase) -> dict:
    """Loss, output, gradients by state_dict key, and input gradients from torch autograd."""
    module = case.module
    module.zero_grad(set_to_none=True)
    x = torch.from_numpy(case.inputs.copy())
    if x.is_floating_point():
        x.requires_grad_(True)
    out = module(x)
    if case.loss == "mse":
        loss = nn.functional.mse_loss(out, torch.from_numpy(case.targets))
    else:
        loss = nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), torch.from_numpy(case.targets).reshape(-1),
            ignore_index=-100 if case.ignore_index is None else case.ignore_index)
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in module.state_dict(keep_vars=True).items()
             if isinstance(p, nn.Parameter) and p.grad is not None}
    inputs = {"x": x.grad.numpy().copy()} if x.requires_grad else {}
    return {"loss": loss.item(), "output": out.detach().numpy().copy(), "grads": grads,
            "inputs": inputs}


def graph_rel_err(got: np.ndarray, want: np.ndarray, floor: float) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    if not np.isfinite(diff):
        return math.inf
    return float(diff / max(np.max(np.abs(want)) if want.size else 0.0, floor, TINY))


def tracing_checks(failures: List[str]) -> None:
    """What the tracer must refuse, with a message naming the culprit (no server needed)."""
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(self.fc(x).unsqueeze(1)).squeeze(1)

    class ComputedMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return h.masked_fill(h > 0, 0.0)

    x = np.zeros((2, 4), dtype=np.float32)
    checks = [
        ("unsupported module", Conv(), {}, "conv"),
        ("mask computed on the server", ComputedMask(), {}, "mask"),
        ("Dropout training, no seed", nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)), {},
         "dropout_seed"),
        ("Dropout training, seeded", nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)),
         {"dropout_seed": 7}, None),
    ]
    results = []
    for label, module, kwargs, expect in checks:
        try:
            model = gg.from_module(module, x, loss="mse", **kwargs)
            outcome = "traced: " + " ".join(n.op_type for n in model.graph.nodes)
            ok = expect is None
        except gg.UnsupportedError as error:
            outcome = f"UnsupportedError: {error}"
            ok = expect is not None and expect in str(error)
        if not ok:
            failures.append(f"tracing check '{label}': {outcome}")
        results.append(f"  {'ok  ' if ok else 'FAIL'} {label}: {outcome}")
    print("\ntracer refusals (gradserve.graph.UnsupportedError):")
    print("\n".join(results))


def run_onnx_cases(stub, args, failures: List[str], worst: dict) -> int:
    """Exports the ONNX test modules afresh (gradserve.onnx.from_torch) and compares each
    answer with autograd on new batches; returns the number of cases."""
    sys.path.insert(0, str(REPO / "tests" / "data" / "onnx"))
    import export_models as em  # The test models' definitions.

    print("\nONNX models (gradserve.onnx.from_torch, torch.onnx.export opset 17 / 13): "
          "per-tensor error as for graph models; worst tensor per case")
    torch.manual_seed(args.seed)
    cases = [
        ("mlp", lambda: em.ActivationMLP(), lambda b, t: torch.randn(b, 5), "mse", 17),
        ("residual_mlp", lambda: torch_models.ResidualMLP(5, 8, 16, 3, 2),
         lambda b, t: torch.randn(b, 5), "mse", 17),
        ("residual_mlp13", lambda: torch_models.ResidualMLP(5, 8, 16, 3, 2),
         lambda b, t: torch.randn(b, 5), "mse", 13),
        ("mha_decoder", lambda: em.MHADecoder(), lambda b, t: torch.randint(0, 11, (b, t)),
         "cross_entropy", 17),
        ("gpt_tied", lambda: torch_models.GPT(11, 6, 2, 2, 8),
         lambda b, t: torch.randint(0, 11, (b, t)), "cross_entropy", 17),
    ]
    count = 0
    for name, make, batch, loss, opset in cases:
        for dtype in (torch.float64, torch.float32):
            module = make().to(dtype)
            # ONNX holds float attributes in float32 (LayerNormalization's epsilon): the
            # reference uses the epsilon the file can hold, or PyTorch's float64 1e-5 alone
            # would differ by ~1e-9 on the GPT (README, ONNX models).
            for m in module.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eps = float(np.float32(m.eps))
            example = batch(2, 6)
            if example.is_floating_point():
                example = example.to(dtype)
            try:
                model = gradserve.onnx.from_torch(module, (example,), loss=loss, opset=opset)
            except Exception as error:  # noqa: BLE001 - an export failure is a failed case
                failures.append(f"onnx {name}: export failed: {error}")
                continue
            for b, t in ((3, 6), (5, 4)):
                count += 1
                x = batch(b, t)
                if x.is_floating_point():
                    x = x.to(dtype)
                    y = torch.randn(b, 3, dtype=dtype)
                else:
                    y = torch.randint(0, 11, (b, t))
                module.zero_grad()
                out = module(x)
                ref_loss = (nn.functional.mse_loss(out, y) if loss == "mse" else
                            nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                        y.reshape(-1)))
                ref_loss.backward()
                label = f"onnx {name} {str(dtype)[6:]} batch {list(x.shape)}"
                try:
                    got_loss, grads = model.compute(stub, x.numpy(), y.numpy(),
                                                    timeout=args.timeout)
                except grpc.RpcError as error:
                    failures.append(f"{label}: {error.code().name}: {error.details()}")
                    print(f"{label}: RPC ERROR {error.code().name}: {error.details()}")
                    continue
                want = {k: p.grad.numpy() for k, p in module.named_parameters()}
                G = max(float(np.max(np.abs(g))) for g in want.values())
                errors = {"loss": abs(got_loss - ref_loss.item()) / max(abs(ref_loss.item()),
                                                                        TINY)}
                for key, g in want.items():
                    errors[key] = (graph_rel_err(grads[key], g, GRAPH_FLOOR * G)
                                   if key in grads else math.inf)
                tensor, err = max(errors.items(), key=lambda kv: kv[1])
                np_dtype = np.float64 if dtype == torch.float64 else np.float32
                ok = err <= THRESHOLD[np_dtype]
                if err > worst[np_dtype][0]:
                    worst[np_dtype] = (err, label)
                if not ok:
                    failures.append(f"{label}: {tensor} error {err:.2e}")
                if not (ok and args.quiet):
                    print(f"{label:<48} {err:>9.2e}  worst: {tensor}"
                          f"{'' if ok else '  <-- FAIL'}")
    return count


def run_graph_cases(stub, args, failures: List[str], worst: dict) -> int:
    """Runs every graph case; returns the number of cases."""
    tracing_checks(failures)
    print("\ngraph models (client/python/gradserve/graph.py from torch.nn modules): "
          "per-tensor error = max|server - torch| / max(max|torch|, "
          f"{GRAPH_FLOOR:g} * largest |torch grad| of the case)")
    header = f"{'case':<13} {'dtype':<7} {'tensor':<40} {'shape':<12} {'max|torch|':>10} " \
             f"{'rel err':>9}"
    print(header)
    print("-" * len(header))
    count = 0
    for case in graph_cases(args.seed):
        count += 1
        label = f"{case.name:<13} {DTYPE_NAME[case.dtype]:<7}"
        try:
            model = gg.from_module(case.module, case.inputs, loss=case.loss,
                                   ignore_index=case.ignore_index, dtype=case.dtype)
        except Exception as error:  # noqa: BLE001 - a tracing failure is a failed case
            failures.append(f"{case.describe()}: tracing failed: {error}")
            print(f"{label} TRACING FAILED: {error}")
            continue
        reference = graph_reference(case)
        # The traced graph run forward in numpy (float64): catches a wrong graph before
        # blaming the server for it.
        values = graph_numpy.run(model.graph, {**model.parameter_arrays(case.module, np.float64),
                                               **model.input_arrays(case.inputs, case.targets)})
        numpy_loss = graph_numpy.loss_value(model.model, values)
        request = model.request(case.module, case.inputs, case.targets, return_output=True,
                                input_gradients=case.input_gradients)
        response, error = call(stub, request, args.timeout)
        if error is not None:
            failures.append(f"{case.describe()}: {error}")
            print(f"{label} RPC ERROR {error}")
            continue
        G = max(float(np.max(np.abs(g))) for g in reference["grads"].values())
        floor = GRAPH_FLOOR * G
        rows = [("loss", "[]", abs(reference["loss"]),
                 abs(response.loss - reference["loss"]) / max(abs(reference["loss"]), TINY))]
        outputs = gc.named_arrays(response.outputs)
        want = reference["output"]
        got = outputs.get(model.output_name)
        rows.append((f"output ({model.output_name})", str(list(want.shape)),
                     float(np.max(np.abs(want))),
                     graph_rel_err(got, want, TINY) if got is not None else math.inf))
        got_grads = model.gradients(response)
        for key, want in reference["grads"].items():
            tied = "" if model.aliases.get(key, key) == key else f" (= {model.aliases[key]})"
            got = got_grads.get(key)
            err = math.inf if got is None else graph_rel_err(got, want, floor)
            rows.append((key + tied, str(list(want.shape)), float(np.max(np.abs(want))), err))
        missing = sorted(set(got_grads) - set(reference["grads"]))
        for key in missing:
            rows.append((f"{key} (torch: no grad)", "", 0.0, math.inf))
        got_inputs = gc.named_arrays(response.input_gradients)
        for key, want in reference["inputs"].items():
            got = got_inputs.get(key)
            err = math.inf if got is None else graph_rel_err(got, want, floor)
            rows.append((f"d{key}", str(list(want.shape)), float(np.max(np.abs(want))), err))
        case_worst = max(err for *_, err in rows)
        ok = case_worst <= THRESHOLD[case.dtype]
        if case_worst > worst[case.dtype][0]:
            worst[case.dtype] = (case_worst, case.name)
        for tensor, shape, scale, err in rows:
            bad = err > THRESHOLD[case.dtype]
            if bad:
                failures.append(f"{case.describe()}: {tensor} error {err:.2e}")
            if args.quiet and not bad:
                continue
            print(f"{label} {tensor:<40} {shape:<12} {scale:>10.3e} {err:>9.2e}"
                  f"{'  <-- FAIL' if bad else ''}")
        trace_err = abs(numpy_loss - reference["loss"]) / max(abs(reference["loss"]), TINY)
        if trace_err > THRESHOLD[case.dtype]:
            failures.append(f"{case.describe()}: the traced graph's loss (numpy) is off by "
                            f"{trace_err:.2e}: a tracing bug")
        print(f"{label} => {len(rows)} tensors, worst {case_worst:.2e} "
              f"{'ok' if ok else 'FAIL'}; {len(model.graph.nodes)} nodes, "
              f"{len(model.parameter_names)} parameters, "
              f"{'any batch size' if model.batch_flexible else 'batch fixed'}; traced graph's "
              f"numpy forward loss vs torch {trace_err:.1e}; fwd {response.stats.forward_micros / 1e3:.1f} ms, "
              f"bwd {response.stats.backward_micros / 1e3:.1f} ms")
        if case.name.startswith("gpt2") and case.inputs.shape[1] == 16:
            check_graph_checkpointing(stub, args, case, model, response, failures)
            check_graph_stream(stub, args, case, model, failures)
    return count


def check_graph_stream(stub, args, case, model, failures) -> None:
    """Three SGD steps on one StreamGradients stream (named parameters, then named updates;
    the second batch as two accumulated halves) must answer exactly as unary calls with the
    parameters this side keeps (p = p + u in the request's dtype)."""
    params = model.parameter_arrays(case.module)
    lr = case.dtype(0.1)
    half = case.inputs.shape[0] // 2
    notes, same = [], True
    try:
        channel = gc.connect(args.target)
        with gc.TrainingStream(channel, model.model, case.dtype, timeout=args.timeout,
                               chunk_bytes=16 << 10) as stream:
            update = None
            for step in range(3):
                inputs = model.input_arrays(case.inputs, case.targets)
                if step == 1:  # micro-batches: gradients summed as one call on the batch
                    first = {k: v[:half] for k, v in inputs.items()}
                    stream.step(graph_inputs=first, update=update, accumulate=True)
                    rest = {k: v[half:] for k, v in inputs.items()}
                    answer = stream.step(graph_inputs=rest)
                else:
                    answer = stream.step(graph_inputs=inputs, parameters=params if step == 0
                                         else None, update=update)
                unary, error = call(stub, model.request(params, case.inputs, case.targets),
                                    args.timeout)
                if error is not None:
                    raise RuntimeError(error)
                got = gc.named_arrays(answer.result.named_gradients)
                want = gc.named_arrays(unary.named_gradients)
                if step == 1:  # accumulated in float64: equal to rounding, not to the bit
                    err = max([graph_rel_err(got[k], want[k], TINY) for k in want] +
                              [abs(answer.result.loss - unary.loss) / max(abs(unary.loss),
                                                                          TINY)])
                    ok = err <= THRESHOLD[case.dtype]
                    notes.append(f"step {step} (2 micro-batches): max rel diff {err:.1e}")
                else:
                    ok = all(got[k].tobytes() == want[k].tobytes() for k in want) and \
                        answer.result.loss == unary.loss
                    notes.append(f"step {step}: {'bit-identical' if ok else 'DIFFERENT'}")
                same = same and ok
                update = {k: -lr * g for k, g in got.items()}
                params = {k: (params[k] + update[k]).astype(case.dtype) for k in params}
    except (grpc.RpcError, RuntimeError) as error:
        detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) \
            else str(error)
        failures.append(f"{case.describe()} stream: {detail}")
        print(f"{'':<21} StreamGradients vs unary: {detail}")
        return
    if not same:
        failures.append(f"{case.describe()} stream: differs from unary calls ({notes})")
    print(f"{'':<21} StreamGradients (SGD, named updates) vs unary: " + "; ".join(notes))


def check_graph_checkpointing(stub, args, case, model, base, failures) -> None:
    """Every checkpoint mode must give bit-identical gradients, loss and outputs on graphs."""
    def fingerprint(response):
        return (np.float64(response.loss).tobytes(),
                tuple((t.name, t.tensor.data) for t in response.named_gradients))
    peak = base.stats.plan.predicted_peak_bytes
    modes = [("sqrt", gc.checkpointing("sqrt")), ("every_k=1", gc.checkpointing("every_k", 1)),
             ("every_k=3", gc.checkpointing("every_k", 3)),
             ("budget=peak/2", gc.checkpointing("memory_budget",
                                                memory_budget_bytes=max(1, peak // 2)))]
    summary = []
    for name, checkpoint in modes:
        request = model.request(case.module, case.inputs, case.targets, checkpoint=checkpoint)
        response, error = call(stub, request, args.timeout)
        if error is not None:
            if name.startswith("budget") and error.startswith("RESOURCE_EXHAUSTED"):
                summary.append(f"{name}: refused (RESOURCE_EXHAUSTED, documented)")
                continue
            failures.append(f"{case.describe()} checkpoint {name}: {error}")
            summary.append(f"{name}: {error}")
            continue
        same = fingerprint(response) == fingerprint(base)
        if not same:
            failures.append(f"checkpoint {name} on {case.describe()}: differs from no "
                            "checkpointing")
        summary.append(f"{name}:{'same' if same else 'DIFFERENT'}"
                       f"(recomp={response.stats.layers_recomputed},"
                       f"peak={response.stats.plan.predicted_peak_bytes})")
    print(f"{'':<21} checkpointing vs none (peak={peak}): " + "  ".join(summary))


def call(stub, request, timeout: float):
    try:
        return stub.ComputeGradients(request, timeout=timeout), None
    except grpc.RpcError as error:
        return None, f"{error.code().name}: {error.details()}"


def response_fingerprint(response) -> tuple:
    """Everything numeric the client gets back, as raw bytes: equality means bit-identical."""
    return (np.float64(response.loss).tobytes(),
            tuple((g.weight.data, g.bias.data) for g in response.gradients),
            response.input_gradient.data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of a running gradserve")
    parser.add_argument("--rounds", type=int, default=3,
                        help=f"rounds of {2 * len(LOSSES) * len(REDUCTIONS)} random cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--quiet", action="store_true", help="print only failing rows")
    parser.add_argument("--only", choices=("all", "chain", "graph", "onnx"), default="all",
                        help="run only the chain (layers), graph-model or ONNX cases")
    args = parser.parse_args()

    torch.set_num_threads(1)  # deterministic reductions in the reference
    channel = gc.connect(args.target)
    stub = gc.stub(channel)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=args.timeout)
    print(f"server {args.target}: gradserve {info.version}, {info.threads} threads per call")
    print(f"torch {torch.__version__}, numpy {np.__version__}, seed {args.seed}")
    print("error = max|server - torch| / max(max|torch|, tiny) per tensor (loss, every dW, db, "
          "dx); row = worst tensor")
    print(f"thresholds: float64 <= {THRESHOLD[np.float64]:g}, float32 <= "
          f"{THRESHOLD[np.float32]:g}\n")

    worst = {np.float64: (0.0, ""), np.float32: (0.0, "")}
    failures: List[str] = []

    def run_case(index: int, case: Case, checkpoint=None):
        response, error = call(stub, request_for(case, checkpoint), args.timeout)
        reduction = case.reduction or "(unset)"
        label = f"{index:>4} {case.name:<15} {DTYPE_NAME[case.dtype]:<7} {case.loss_label:<15} " \
                f"{reduction:<9} {case.batch:>5}"
        if error is not None:
            failures.append(f"#{index} {case.name}: {error}")
            print(f"{label} {'RPC ERROR':>11}        {case.arch()}\n      {error}")
            return None
        errors = compare(case, response, torch_reference(case))
        tensor, err = max(errors.items(), key=lambda kv: kv[1])
        ok = err <= THRESHOLD[case.dtype]
        if err > worst[case.dtype][0]:
            worst[case.dtype] = (err, f"#{index}")
        if not ok:
            detail = ", ".join(f"{k}={v:.2e}" for k, v in errors.items())
            failures.append(f"#{index} {case.name} {DTYPE_NAME[case.dtype]} {case.loss_label} "
                            f"{reduction} [{case.arch()}]: {detail}")
        if ok and args.quiet:
            return response
        notes = (" (defaults unset)" if case.send_defaults_unset else "") + \
            ("" if ok else "  <-- FAIL")
        print(f"{label} {err:>11.2e} {tensor:<6} {case.arch()}{notes}")
        return response

    index = 0
    if args.only == "graph":
        index += run_graph_cases(stub, args, failures, worst)
        return finish(index, worst, failures, channel)
    if args.only == "onnx":
        index += run_onnx_cases(stub, args, failures, worst)
        return finish(index, worst, failures, channel)
    header = (f"{'#':>4} {'case':<15} {'dtype':<7} {'loss':<15} {'reduction':<9} {'batch':>5} "
              f"{'max rel err':>11} {'worst':<6} model")
    print(header)
    print("-" * len(header))
    for case in make_cases(args.rounds, args.seed):
        run_case(index, case)
        index += 1

    print("\nwide layers, big batches, saturating inputs, single-class cross-entropy:")
    for case in stress_cases(args.seed):
        run_case(index, case)
        index += 1

    print("\nderivatives at kinks (exact ties; PyTorch's convention is the reference):")
    for case in kink_cases():
        run_case(index, case)
        index += 1

    print("\ncheckpointing: every mode must be bit-identical to MODE_NONE (loss, dW, db, dx)")
    for case in checkpoint_cases(args.seed):
        base = run_case(index, case, gc.checkpointing("none"))
        index += 1
        if base is None:
            continue
        n_layers = len(case.model)
        none_peak = base.stats.plan.predicted_peak_bytes
        modes = [("unset", None), ("sqrt", gc.checkpointing("sqrt"))]
        modes += [(f"every_k={k}", gc.checkpointing("every_k", every_k=k))
                  for k in sorted({1, 2, 3, n_layers})]
        modes += [(f"budget={b}", gc.checkpointing("memory_budget", memory_budget_bytes=b))
                  for b in (1, max(1, none_peak // 2), none_peak, 1 << 40)]
        summary = []
        for mode_name, checkpoint in modes:
            request = request_for(case)
            if checkpoint is not None:
                request.options.checkpointing.CopyFrom(checkpoint)
            response, error = call(stub, request, args.timeout)
            if error is not None:
                failures.append(f"checkpoint {mode_name} on #{index - 1}: {error}")
                summary.append(f"{mode_name}: {error}")
                continue
            same = response_fingerprint(response) == response_fingerprint(base)
            if not same:
                failures.append(f"checkpoint {mode_name} on #{index - 1} [{case.arch()}]: "
                                "differs from MODE_NONE")
            plan = response.stats.plan
            budget = "" if not mode_name.startswith("budget") else \
                f",met={int(plan.budget_met)}"
            summary.append(f"{mode_name}:{'same' if same else 'DIFFERENT'}"
                           f"(recomp={response.stats.layers_recomputed}{budget})")
        print(f"      {n_layers} layers: " + "  ".join(summary))

    if args.only == "all":
        index += run_graph_cases(stub, args, failures, worst)
        index += run_onnx_cases(stub, args, failures, worst)
    return finish(index, worst, failures, channel)


def finish(index: int, worst: dict, failures: List[str], channel) -> int:
    print()
    w64, w32 = worst[np.float64], worst[np.float32]
    status = "FAIL" if failures else "PASS"
    checkpoint_ok = not any(f.startswith("checkpoint") for f in failures)
    print(f"SUMMARY: {index} cases; worst float64 error {w64[0]:.3e} ({w64[1]}) vs "
          f"{THRESHOLD[np.float64]:g}; worst float32 error {w32[0]:.3e} ({w32[1]}) vs "
          f"{THRESHOLD[np.float32]:g}; checkpoint modes "
          f"{'bit-identical' if checkpoint_ok else 'DIFFER'}; {status}")
    for failure in failures:
        print(f"  FAIL {failure}")
    channel.close()
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
