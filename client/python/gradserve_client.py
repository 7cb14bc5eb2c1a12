"""Helpers for calling gradserve from Python.

* ``to_tensor`` / ``from_tensor``: numpy arrays <-> ``gradserve.v1.Tensor``.
* ``request_from_sequential``: a ``ComputeGradientsRequest`` mirroring a ``torch.nn.Sequential``.
* ``connect``: a channel whose message limits match the server's (gRPC's default is 4 MiB).

The stubs are generated, not checked in: run ``client/python/generate.sh`` first. numpy and grpc
are the only hard dependencies; torch is imported only by ``request_from_sequential``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import grpc
import numpy as np

try:
    from gradserve.v1 import gradserve_pb2 as pb
    from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
except ImportError as error:  # pragma: no cover - only hit before generate.sh has run
    raise ImportError(
        "gradserve.v1 stubs not found: run client/python/generate.sh and put client/python "
        "on sys.path") from error

__all__ = [
    "pb", "pb_grpc", "connect", "stub", "to_tensor", "from_tensor", "gradients",
    "checkpointing", "loss", "request_from_sequential",
]

# The wire format is always little-endian, whatever the host: these are the numpy dtype strings
# for each wire dtype, and the reverse map for numpy arrays we are given.
_WIRE_DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY = {np.dtype(d).newbyteorder("="): k for k, d in _WIRE_DTYPES.items()}


def _as_numpy(value: Any) -> np.ndarray:
    """Accepts numpy arrays, nested lists and torch tensors (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _wire_dtype(dtype: Any) -> int:
    """A DType enum value from a DType value or anything numpy accepts as a dtype."""
    if isinstance(dtype, int) and dtype in _WIRE_DTYPES:
        return dtype
    key = np.dtype(dtype).newbyteorder("=")
    if key not in _FROM_NUMPY:
        raise ValueError(f"gradserve has no dtype for numpy {np.dtype(dtype)}; "
                         "use float32, float64, int32 or int64")
    return _FROM_NUMPY[key]


def to_tensor(array: Any, dtype: Any = None) -> "pb.Tensor":
    """Packs an array as a Tensor: dtype, shape, little-endian row-major bytes.

    ``dtype`` (numpy dtype or DType) converts first; by default the array's own dtype is kept,
    so a float64 array is never silently narrowed.
    """
    array = _as_numpy(array)
    wire = _wire_dtype(array.dtype if dtype is None else dtype)
    if array.ndim == 0:
        raise ValueError("gradserve tensors have rank >= 1")
    # astype to the explicit little-endian dtype does the byte swap on big-endian hosts, and
    # tobytes() writes C order whatever the input's strides.
    data = array.astype(_WIRE_DTYPES[wire], copy=False).tobytes(order="C")
    return pb.Tensor(dtype=wire, shape=list(array.shape), data=data)


def from_tensor(tensor: "pb.Tensor") -> np.ndarray:
    """Unpacks a Tensor into a writable numpy array in native byte order."""
    if tensor.dtype not in _WIRE_DTYPES:
        raise ValueError(f"unsupported tensor dtype {pb.DType.Name(tensor.dtype)}")
    wire = _WIRE_DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    expected = math.prod(shape) * wire.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor of shape {list(shape)} and {pb.DType.Name(tensor.dtype)} "
                         f"needs {expected} bytes, has {len(tensor.data)}")
    # frombuffer aliases the (immutable) bytes; astype copies into a native, writable array.
    return np.frombuffer(tensor.data, dtype=wire).reshape(shape).astype(wire.newbyteorder("="))


def gradients(response: "pb.ComputeGradientsResponse") -> list:
    """[(dW, db or None)] per Linear layer, as numpy arrays."""
    return [(from_tensor(g.weight), from_tensor(g.bias) if g.HasField("bias") else None)
            for g in response.gradients]


def connect(target: str, max_message_bytes: int = 256 << 20,
            options: Iterable[tuple] = ()) -> grpc.Channel:
    """An insecure channel to ``target`` that can send and receive ``max_message_bytes``.

    gRPC clients default to a 4 MiB receive limit, far below what the server accepts (256 MiB
    by default; GetServerInfo reports it), so large gradients would fail on the way back.
    """
    channel_options = [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        *options,
    ]
    return grpc.insecure_channel(target, options=channel_options)


def stub(channel: grpc.Channel) -> "pb_grpc.GradientServiceStub":
    return pb_grpc.GradientServiceStub(channel)


_CHECKPOINT_MODES = {
    "none": pb.Checkpointing.MODE_NONE,
    "every_k": pb.Checkpointing.MODE_EVERY_K,
    "sqrt": pb.Checkpointing.MODE_SQRT,
    "memory_budget": pb.Checkpointing.MODE_MEMORY_BUDGET,
}


def checkpointing(mode: str, every_k: int = 0, memory_budget_bytes: int = 0) -> "pb.Checkpointing":
    """Checkpointing options by name: "none", "every_k", "sqrt" or "memory_budget"."""
    return pb.Checkpointing(mode=_CHECKPOINT_MODES[mode], every_k=every_k,
                            memory_budget_bytes=memory_budget_bytes)


# Loss names accepted by ``loss``: the Loss.kind field names plus the PyTorch class names, so a
# caller can pass type(criterion).__name__.
_LOSS_KINDS = {
    "mse": "mse", "MSELoss": "mse",
    "l1": "l1", "L1Loss": "l1",
    "huber": "huber", "HuberLoss": "huber",
    "cross_entropy": "cross_entropy", "CrossEntropyLoss": "cross_entropy",
    "bce_with_logits": "bce_with_logits", "BCEWithLogitsLoss": "bce_with_logits",
    "external": "external",
}
_REDUCTIONS = {
    None: pb.REDUCTION_UNSPECIFIED,
    "mean": pb.REDUCTION_MEAN,
    "sum": pb.REDUCTION_SUM,
}


def loss(name: str, reduction: Optional[str] = "mean", delta: Optional[float] = None) -> "pb.Loss":
    """A Loss message. ``delta`` is HuberLoss's threshold (None leaves it unset: 1.0)."""
    if name not in _LOSS_KINDS:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(set(_LOSS_KINDS))}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or None, not {reduction!r}")
    kind = _LOSS_KINDS[name]
    message = pb.Loss(reduction=_REDUCTIONS[reduction])
    if kind == "huber":
        message.huber.SetInParent()
        if delta is not None:
            message.huber.delta = float(delta)
    else:
        if delta is not None:
            raise ValueError("delta only applies to the Huber loss")
        getattr(message, kind).SetInParent()
    return message


def _layers_of(module) -> list:
    """Flattens nested Sequentials so a model built from blocks still maps layer by layer."""
    import torch.nn as nn

    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _layers_of(child)]
    return [module]


def request_from_sequential(model, loss_name: str, inputs: Any, targets: Any = None, *,
                            reduction: Optional[str] = "mean",
                            huber_delta: Optional[float] = None,
                            output_gradient: Any = None,
                            dtype: Any = None,
                            return_input_gradient: bool = False,
                            return_output: bool = False,
                            checkpoint: Optional["pb.Checkpointing"] = None,
                            allow_non_finite: bool = False) -> "pb.ComputeGradientsRequest":
    """A ComputeGradientsRequest computing what ``loss(model(inputs), targets).backward()`` does.

    ``model`` is a torch.nn.Sequential of Linear, ReLU, LeakyReLU, Sigmoid, Tanh, GELU and
    Identity. ``loss_name`` is a Loss.kind ("mse", "cross_entropy", ...) or a PyTorch loss class
    name. Every floating tensor is sent in ``dtype`` (default: the model's parameter dtype), as
    the API requires one floating dtype per request; class targets keep their integer dtype.
    For "external", pass ``output_gradient`` (dL/d(output)) instead of ``targets``.
    """
    import torch.nn as nn

    layers = _layers_of(model)
    params = [p for p in model.parameters()]
    if dtype is None:
        dtype = params[0].detach().cpu().numpy().dtype if params else _as_numpy(inputs).dtype
    float_dtype = np.dtype(dtype)
    if float_dtype.kind != "f":
        raise ValueError(f"request dtype must be float32 or float64, not {float_dtype}")

    request = pb.ComputeGradientsRequest()
    for index, module in enumerate(layers):
        layer = request.model.layers.add()
        if isinstance(module, nn.Linear):
            has_bias = module.bias is not None
            layer.linear.in_features = module.in_features
            layer.linear.out_features = module.out_features
            layer.linear.bias = has_bias
            parameters = request.parameters.add()
            parameters.weight.CopyFrom(to_tensor(module.weight, float_dtype))
            if has_bias:
                parameters.bias.CopyFrom(to_tensor(module.bias, float_dtype))
        elif isinstance(module, nn.ReLU):
            layer.relu.SetInParent()
        elif isinstance(module, nn.LeakyReLU):
            layer.leaky_relu.negative_slope = float(module.negative_slope)
        elif isinstance(module, nn.Sigmoid):
            layer.sigmoid.SetInParent()
        elif isinstance(module, nn.Tanh):
            layer.tanh.SetInParent()
        elif isinstance(module, nn.GELU):
            approximate = getattr(module, "approximate", "none")
            if approximate not in ("none", "tanh"):
                raise ValueError(f"layer {index}: GELU(approximate={approximate!r}) unsupported")
            layer.gelu.approximation = (pb.GELU.APPROXIMATION_TANH if approximate == "tanh"
                                        else pb.GELU.APPROXIMATION_NONE)
        elif isinstance(module, nn.Identity):
            layer.identity.SetInParent()
        else:
            raise ValueError(f"layer {index}: {type(module).__name__} has no gradserve "
                             "equivalent (supported: Linear, ReLU, LeakyReLU, Sigmoid, Tanh, "
                             "GELU, Identity)")

    request.model.loss.CopyFrom(loss(loss_name, reduction, huber_delta))
    request.inputs.CopyFrom(to_tensor(inputs, float_dtype))
    kind = _LOSS_KINDS[loss_name]
    if kind == "external":
        if output_gradient is None or targets is not None:
            raise ValueError("the external loss takes output_gradient and no targets")
        request.output_gradient.CopyFrom(to_tensor(output_gradient, float_dtype))
    else:
        if targets is None or output_gradient is not None:
            raise ValueError(f"the {kind} loss takes targets and no output_gradient")
        targets = _as_numpy(targets)
        # Class indices keep their integer type (INT32 or INT64); everything else is floating.
        target_dtype = targets.dtype if kind == "cross_entropy" else float_dtype
        request.targets.CopyFrom(to_tensor(targets, target_dtype))

    options = request.options
    options.return_input_gradient = return_input_gradient
    options.return_output = return_output
    options.allow_non_finite = allow_non_finite
    if checkpoint is not None:
        options.checkpointing.CopyFrom(checkpoint)
    return request
