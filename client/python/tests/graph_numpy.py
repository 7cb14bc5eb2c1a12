"""A forward-only numpy interpreter of gradserve graph models: a reference for tests.

    values = run(model.graph, {"x": x, "targets": t, **params})   # every value by name
    loss = loss_value(model, values)

Covers the ops gradserve.graph writes (Gemm, MatMul, the arithmetic with broadcasting, the
activations, LayerNormalization, Softmax, Where, Gather, Transpose, Reshape, Split, Slice,
Squeeze, Unsqueeze, Concat, ReduceMean/ReduceSum, Identity, Dropout when not training) with
ONNX semantics, in float64 whatever the inputs' dtype, and the losses on the graph's output. It
checks a traced graph's structure without a server or torch; gradients are the server's job.
"""

import math
from typing import Dict

import numpy as np

from gradserve import graph as gg
from gradserve.client import pb

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _attrs(node) -> Dict[str, object]:
    out = {}
    for a in node.attributes:
        kind = a.WhichOneof("value")
        value = getattr(a, kind)
        if kind in ("ints", "floats"):
            value = list(value.values)
        elif kind == "t":
            value = gg._from_graph_tensor(value)
        out[a.name] = value
    return out


def _gelu(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _node(op, ins, a, n_out):
    """The outputs of one node (a list)."""
    x = ins[0] if ins else None
    if op in ("Add", "Sub", "Mul", "Div"):
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return [f(ins[0], ins[1])]
    unary = {"Neg": np.negative, "Exp": np.exp, "Sqrt": np.sqrt, "Erf": _erf, "Tanh": np.tanh,
             "Sigmoid": lambda v: 1 / (1 + np.exp(-v)), "Relu": lambda v: np.maximum(v, 0),
             "Identity": lambda v: v}
    if op in unary:
        return [unary[op](x)]
    if op == "LeakyRelu":
        return [np.where(x >= 0, x, a.get("alpha", 0.01) * x)]
    if op == "Gelu":
        return [_gelu(x, a.get("approximate", "none"))]
    if op == "Pow":
        return [np.power(x, ins[1])]
    if op == "Gemm":
        A = ins[0].T if a.get("transA", 0) else ins[0]
        B = ins[1].T if a.get("transB", 0) else ins[1]
        y = a.get("alpha", 1.0) * (A @ B)
        if len(ins) > 2 and ins[2] is not None:
            y = y + a.get("beta", 1.0) * ins[2]
        return [y]
    if op == "MatMul":
        return [np.matmul(ins[0], ins[1])]
    if op == "LayerNormalization":
        axis = a.get("axis", -1)
        axes = tuple(range(axis % x.ndim, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + a.get("epsilon", 1e-5)) * ins[1]
        return [y + ins[2] if len(ins) > 2 and ins[2] is not None else y]
    if op == "Softmax":
        return [_softmax(x, a.get("axis", -1))]
    if op == "Where":
        return [np.where(ins[0], ins[1], ins[2])]
    if op == "Gather":
        return [np.take(x, ins[1].astype(np.int64), axis=a.get("axis", 0))]
    if op == "Transpose":
        return [np.transpose(x, a.get("perm"))]
    if op == "Reshape":
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(ins[1].tolist())]
        return [x.reshape(shape)]
    if op == "Split":
        axis = a.get("axis", 0)
        sizes = ins[1].tolist() if len(ins) > 1 and ins[1] is not None else \
            [x.shape[axis] // n_out] * n_out
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    if op == "Slice":
        index = [slice(None)] * x.ndim
        steps = ins[4].tolist() if len(ins) > 4 else [1] * len(ins[1])
        for s, e, ax, st in zip(ins[1].tolist(), ins[2].tolist(), ins[3].tolist(), steps):
            index[ax] = slice(s, e, st)
        return [x[tuple(index)]]
    if op == "Squeeze":
        return [np.squeeze(x, axis=tuple(ins[1].tolist()))]
    if op == "Unsqueeze":
        for axis in sorted(ins[1].tolist()):
            x = np.expand_dims(x, axis)
        return [x]
    if op == "Concat":
        return [np.concatenate(ins, axis=a["axis"])]
    if op == "ReduceMean":
        return [x.mean(axis=tuple(a["axes"]), keepdims=bool(a.get("keepdims", 1)))]
    if op == "ReduceSum":
        return [x.sum(axis=tuple(ins[1].tolist()), keepdims=bool(a.get("keepdims", 1)))]
    if op == "Dropout":
        if len(ins) > 2 and ins[2] is not None and bool(ins[2]):
            raise NotImplementedError("Dropout in training mode (server-side masks)")
        return [x, np.ones(x.shape, dtype=bool)][:n_out]
    if op == "Constant":
        return [np.asarray(next(iter(a.values())))]
    raise NotImplementedError(f"op {op}")


def run(graph: "pb.Graph", feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Every value of ``graph`` given its inputs and parameters by name (float data as
    float64). Nodes may come in any order, as on the wire."""
    values: Dict[str, np.ndarray] = {}
    for name, array in feeds.items():
        array = np.asarray(array)
        values[name] = array.astype(np.float64) if array.dtype.kind == "f" else array
    for c in graph.constants:
        array = gg._from_graph_tensor(c.tensor)
        values[c.name] = array.astype(np.float64) if array.dtype.kind == "f" else array
    pending = list(graph.nodes)
    while pending:
        ready = [n for n in pending if all(i == "" or i in values for i in n.inputs)]
        if not ready:
            raise ValueError(f"undefined inputs or a cycle at {pending[0].op_type} "
                             f"{list(pending[0].inputs)}")
        for n in ready:
            ins = [values[i] if i else None for i in n.inputs]
            outs = _node(n.op_type, ins, _attrs(n), len(n.outputs))
            for name, out in zip(n.outputs, outs):
                values[name] = np.asarray(out)
        pending = [n for n in pending if n not in ready]
    return values


def loss_value(model: "pb.Model", values: Dict[str, np.ndarray]) -> float:
    """The model's loss on ``values`` (from ``run``)."""
    out = values[model.graph.loss_output]
    target = values[model.graph.loss_target]
    kind = model.loss.WhichOneof("kind")
    mean = model.loss.reduction != pb.REDUCTION_SUM
    if kind == "cross_entropy":
        ignore = model.loss.cross_entropy.ignore_index \
            if model.loss.cross_entropy.HasField("ignore_index") else -100
        logits = out.reshape(-1, out.shape[-1])
        t = target.reshape(-1)
        keep = t != ignore
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        per = -logp[np.arange(len(t))[keep], t[keep]]
        return float(per.sum() / (keep.sum() if mean else 1))
    if kind == "mse":
        per = (out - target) ** 2
    elif kind == "l1":
        per = np.abs(out - target)
    else:
        raise NotImplementedError(f"loss {kind}")
    return float(per.mean() if mean else per.sum())
