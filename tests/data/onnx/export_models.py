#!/usr/bin/python3
"""Exports the ONNX test models and PyTorch's gradients for them (needs Debian's python3-torch
and python3-onnx; the test suite itself needs neither: it reads what this script wrote).

    /usr/bin/python3 tests/data/onnx/export_models.py [OUT_DIR]   (default: this directory)

Each model is exported as a PyTorch user would (torch.onnx.export in training mode, no constant
folding, dynamic batch and sequence axes) to NAME.onnx (float32) and, where the reference is
float64, NAME.f64.onnx (the same module after .double()). NAME.json holds one batch, its target,
the loss, and PyTorch autograd's loss and gradients for it, by initializer name, in float64 and
in float32:

    {"model": "mlp", "loss": "mse", "inputs": {"x": TENSOR}, "target": TENSOR,
     "float64": {"file": "mlp.f64.onnx", "loss": L, "gradients": {"0.weight": TENSOR, ...}},
     "float32": {"file": "mlp.onnx", ...}, "options": {...}}
    TENSOR = {"dtype": "float64" | "int64", "shape": [...], "data": [... row-major ...]}

Floats are written with repr (17 significant digits): read back as float64 they are exact.
"""
import io
import json
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "client", "python", "examples"))
from torch_models import GPT, ResidualMLP  # noqa: E402


class ActivationMLP(nn.Module):
    """Every activation gradserve has, between Linear layers (Gemm in ONNX).

    ONNX stores FLOAT attributes in float32: LeakyReLU's slope 0.1 would reach the server as
    0.100000001490116 and its float64 gradients would differ from PyTorch's by ~1e-9 relative
    for that reason alone. The slope here is exact in float32."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.LeakyReLU(0.125), nn.Linear(7, 7),
            nn.Sigmoid(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 7), nn.GELU(),
            nn.Linear(7, 7), nn.GELU(approximate="tanh"), nn.Identity(), nn.Linear(7, 3))

    def forward(self, x):
        return self.net(x)


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class MHABlock(nn.Module):
    """A pre-norm decoder block on nn.MultiheadAttention with an additive causal mask."""

    def __init__(self, d, heads, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.register_buffer(
            "mask", torch.triu(torch.full((block_size, block_size), float("-inf")), diagonal=1))

    def forward(self, x):
        t = x.size(1)
        h = self.ln_1(x)
        a, _ = self.attn(h, h, h, attn_mask=self.mask[:t, :t], need_weights=False)
        x = x + a
        return x + self.proj(nn.functional.gelu(self.fc(self.ln_2(x))))


class MHADecoder(nn.Module):
    """GPT-2-style: token and position embeddings, 2 MHABlocks, final LayerNorm, LM head."""

    def __init__(self, vocab=11, block_size=6, d=8, heads=2, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList([MHABlock(d, heads, block_size) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tensor_json(t):
    t = t.detach()
    dtype = "int64" if t.dtype == torch.long else "float64"
    data = t.reshape(-1).tolist()
    return {"dtype": dtype, "shape": list(t.shape), "data": data}


def export(module, x, path, opset):
    f = io.BytesIO()
    dynamic = {0: "batch"} if x.dim() == 2 and x.dtype != torch.long else {0: "batch", 1: "t"}
    torch.onnx.export(module, (x,), f, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, opset_version=opset, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": dynamic, "y": dynamic})
    with open(path, "wb") as out:
        out.write(f.getvalue())


def reference(module, x, target, loss):
    module.zero_grad()
    y = module(x)
    if loss == "mse":
        value = nn.functional.mse_loss(y, target)
    else:
        value = nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), target.reshape(-1))
    value.backward()
    grads = {name: tensor_json(p.grad) for name, p in module.named_parameters()}
    return value.item(), grads


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    torch.manual_seed(0)
    cases = [
        # name, module, x, target, loss, opset, options
        ("mlp", ActivationMLP(), torch.randn(4, 5), torch.randn(4, 3), "mse", 17, {}),
        ("residual_mlp", ResidualMLP(5, 8, 16, 3, 2), torch.randn(4, 5), torch.randn(4, 3),
         "mse", 17, {}),
        # Opset 13 has no LayerNormalization: torch writes its decomposition.
        ("residual_mlp_opset13", ResidualMLP(5, 8, 16, 3, 2), torch.randn(4, 5),
         torch.randn(4, 3), "mse", 13, {}),
        ("mha_decoder", MHADecoder(), torch.randint(0, 11, (2, 6)),
         torch.randint(0, 11, (2, 6)), "cross_entropy", 17, {}),
        # nanoGPT's layout: attention in plain torch ops, LM head tied to the token embedding.
        ("gpt_tied", GPT(11, 6, 2, 2, 8), torch.randint(0, 11, (2, 6)),
         torch.randint(0, 11, (2, 6)), "cross_entropy", 17, {}),
        # Dropout in the file: the reference is PyTorch's with dropout off.
        ("dropout_mlp", DropoutMLP(), torch.randn(4, 5), torch.randn(4, 3), "mse", 17,
         {"disable_dropout": True}),
    ]
    for name, module, x, target, loss, opset, options in cases:
        # ONNX holds LayerNormalization's epsilon as a float32 attribute: PyTorch's 1e-5 would
        # reach the server as 9.99999974737875e-06, which alone moves the float64 gradients of
        # a GPT with 0.02-scale embeddings (small variances) by ~1e-9. 2^-17 is exact in both.
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 2.0 ** -17
        record = {"model": name, "loss": loss, "opset": opset, "options": options,
                  "inputs": {"x": tensor_json(x.double() if x.is_floating_point() else x)},
                  "target": tensor_json(target.double() if target.is_floating_point()
                                        else target)}
        module.train()
        export(module, x, os.path.join(out_dir, name + ".onnx"), opset)
        if options.get("disable_dropout"):
            module.eval()
        value, grads = reference(module, x, target, loss)
        record["float32"] = {"file": name + ".onnx", "loss": value, "gradients": grads}
        m64 = module.double()
        x64 = x.double() if x.is_floating_point() else x
        t64 = target.double() if target.is_floating_point() else target
        m64.train()
        export(m64, x64, os.path.join(out_dir, name + ".f64.onnx"), opset)
        if options.get("disable_dropout"):
            m64.eval()
        value, grads = reference(m64, x64, t64, loss)
        record["float64"] = {"file": name + ".f64.onnx", "loss": value, "gradients": grads}
        with open(os.path.join(out_dir, name + ".json"), "w") as out:
            json.dump(record, out, indent=None, separators=(",", ":"))
            out.write("\n")
        print(name, "exported", file=sys.stderr)


if __name__ == "__main__":
    main()
