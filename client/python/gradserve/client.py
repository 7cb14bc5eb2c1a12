"""Helpers for calling gradserve from Python.

* ``to_tensor`` / ``from_tensor``: numpy arrays <-> ``gradserve.v1.Tensor``.
* ``request_from_sequential``: a ``ComputeGradientsRequest`` mirroring a ``torch.nn.Sequential``.
* ``connect``: a channel whose message limits match the server's (gRPC's default is 4 MiB),
  optionally over TLS or mutual TLS, sending a bearer token with every call.
* ``health``: the standard ``grpc.health.v1`` check ("SERVING", "NOT_SERVING", ...).
* ``service_config``: the retry/round_robin service config shared with the C++ client
  (``client/service_config.json``), for ``connect(..., options=[("grpc.service_config", ...)])``.
* ``TrainingStream``: a training loop on one ``StreamGradients`` stream (model sent once,
  then a batch with parameters or an update per step; micro-batching; automatic chunking),
  for chain and graph models.
* ``named_tensors`` / ``named_arrays``: ``{name: array}`` <-> ``NamedTensor`` messages, the
  graph models' parameters, inputs and gradients (``gradserve.graph`` builds graph models, by
  hand or from a torch.nn module, and maps ``state_dict`` names both ways).

The stubs are generated when the package is built (``pip install ./client/python``), or in a
checkout by ``client/python/generate.sh``. numpy and grpc are the only hard dependencies; torch
is imported only by ``request_from_sequential``.

Security (the server's ``--tls-cert``/``--tls-key``, ``--tls-client-ca`` and
``--auth-token-file``; the same options as the C++ ``ClientOptions`` and ``gradclient``)::

    channel = connect("localhost:50051",
                      root_ca_file="ca.pem",            # TLS, trusting this CA (tls=True alone:
                                                        # the system's roots)
                      cert_file="client.pem", key_file="client.key",   # mutual TLS
                      token_file="token")               # or token="...", or $GRADSERVE_AUTH_TOKEN

Any ``root_ca_file``, ``cert_file``/``key_file`` or ``server_name_override`` turns TLS on; there
is no silent fallback to plaintext. The token goes as ``authorization: Bearer <token>`` metadata
on every call: from ``token``, else ``token_file``, else the ``GRADSERVE_AUTH_TOKEN`` environment
variable (``token_env=None`` ignores it). Health checks need no token (the server exempts them).
"""

from __future__ import annotations

import collections
import math
import os
import queue
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import grpc
import numpy as np

try:
    from gradserve.v1 import gradserve_pb2 as pb
    from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
except ImportError as error:  # pragma: no cover - only in a checkout before generating
    raise ImportError(
        "gradserve.v1 stubs not found: install the package (pip install ./client/python) or "
        "generate them in the checkout (client/python/generate.sh)") from error

__all__ = [
    "pb", "pb_grpc", "connect", "read_token_file", "health", "stub", "to_tensor", "from_tensor",
    "gradients", "service_config", "SERVICE_CONFIG_FILE",
    "checkpointing", "loss", "request_from_sequential",
    "graph_tensor", "from_graph_tensor", "named_tensors", "named_arrays", "TrainingStream",
    "linear_prefixes", "parameters_from_state_dict", "state_dict_gradients",
]

# The wire format is always little-endian, whatever the host: these are the numpy dtype strings
# for each wire dtype, and the reverse map for numpy arrays we are given.
_WIRE_DTYPES: Dict["pb.DType", np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY: Dict[np.dtype, "pb.DType"] = {d.newbyteorder("="): k for k, d in _WIRE_DTYPES.items()}


def _as_numpy(value: Any) -> np.ndarray:
    """Accepts numpy arrays, nested lists and torch tensors (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _wire_dtype(dtype: Any) -> "pb.DType":
    """A DType enum value from a DType value or anything numpy accepts as a dtype."""
    if isinstance(dtype, int):
        # The key itself rather than ``dtype``: an enum value is a plain int at run time, but
        # only the key has the stubs' DType type.
        for wire in _WIRE_DTYPES:
            if wire == dtype:
                return wire
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


# --- Graph models (see gradserve.graph for building them) ---------------------------------------

def graph_tensor(array: Any, dtype: Any = None) -> "pb.Tensor":
    """A Tensor for graph fields: like ``gradserve.client.to_tensor``, but rank 0 (scalars) and
    bool (DTYPE_BOOL, one byte per element) are allowed, as graph constants and parameters
    may be."""
    array = _as_numpy(array)
    if (array.dtype if dtype is None else np.dtype(dtype)) == np.bool_:
        return pb.Tensor(dtype=pb.DTYPE_BOOL, shape=list(array.shape),
                         data=array.astype(np.uint8).tobytes(order="C"))
    if array.ndim == 0:
        tensor = to_tensor(array.reshape(1), dtype)
        del tensor.shape[:]
        return tensor
    return to_tensor(array, dtype)


def named_tensors(arrays: Mapping[str, Any], float_dtype: Any = None) -> List["pb.NamedTensor"]:
    """{name: array} -> NamedTensor messages, floating arrays converted to ``float_dtype`` (if
    given), integer ones kept as they are (token ids, class targets)."""
    out = []
    for name, array in arrays.items():
        array = _as_numpy(array)
        dtype = float_dtype if float_dtype is not None and array.dtype.kind == "f" else None
        out.append(pb.NamedTensor(name=name, tensor=graph_tensor(array, dtype)))
    return out


def named_arrays(tensors: Iterable["pb.NamedTensor"]) -> Dict[str, np.ndarray]:
    """NamedTensor messages (named_gradients, input_gradients, outputs) -> {name: numpy array}."""
    return {t.name: from_graph_tensor(t.tensor) for t in tensors}


def from_graph_tensor(tensor: "pb.Tensor") -> np.ndarray:
    """``from_tensor`` for graph fields: scalars (rank 0) and DTYPE_BOOL included."""
    if tensor.dtype == pb.DTYPE_BOOL:
        return np.frombuffer(tensor.data, dtype=np.uint8).reshape(tuple(tensor.shape)) != 0
    if len(tensor.shape) == 0:
        scalar = pb.Tensor(dtype=tensor.dtype, shape=[1], data=tensor.data)
        return from_tensor(scalar).reshape(())
    return from_tensor(tensor)


def gradients(response: "pb.ComputeGradientsResponse"
              ) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """[(dW, db or None)] per Linear layer, as numpy arrays."""
    return [(from_tensor(g.weight), from_tensor(g.bias) if g.HasField("bias") else None)
            for g in response.gradients]


# --- state_dict <-> chain parameters -------------------------------------------------------------
# A chain model's Linear layers are named as a torch.nn.Sequential's state_dict names them: by
# the layer's `name` when it has one (request_from_sequential sets the module's dotted path,
# "0", "block.2", ...), else by its index in model.layers, which is the Sequential's index when
# the chain mirrors a flat Sequential. Keys are "<prefix>.weight" and "<prefix>.bias".


def linear_prefixes(model: "pb.Model") -> List[str]:
    """The state_dict prefix of each Linear layer of a chain model, in model order."""
    return [layer.name or str(index) for index, layer in enumerate(model.layers)
            if layer.WhichOneof("kind") == "linear"]


def parameters_from_state_dict(model: "pb.Model", state_dict: Mapping[str, Any],
                               dtype: Any = None) -> List["pb.LinearParameters"]:
    """``LinearParameters`` for every Linear layer of a chain model, from a PyTorch
    ``state_dict`` (torch tensors or numpy arrays), in ``dtype`` (default: each array's own).

    Raises KeyError naming the missing key, and ValueError for a shape that does not match the
    layer or a bias given to a layer declared without one; unused keys are ignored.
    """
    out = []
    linears = [layer for layer in model.layers if layer.WhichOneof("kind") == "linear"]
    for prefix, layer in zip(linear_prefixes(model), linears):
        weight = _as_numpy(_state_entry(state_dict, f"{prefix}.weight"))
        expected = (layer.linear.out_features, layer.linear.in_features)
        if weight.shape != expected:
            raise ValueError(f"{prefix}.weight has shape {list(weight.shape)}; the layer needs "
                             f"{list(expected)} ([out_features, in_features])")
        entry = pb.LinearParameters(weight=to_tensor(weight, dtype))
        has_bias = not layer.linear.HasField("bias") or layer.linear.bias
        bias_key = f"{prefix}.bias"
        if has_bias:
            bias = _as_numpy(_state_entry(state_dict, bias_key))
            if bias.shape != (layer.linear.out_features,):
                raise ValueError(f"{bias_key} has shape {list(bias.shape)}; the layer needs "
                                 f"[{layer.linear.out_features}]")
            entry.bias.CopyFrom(to_tensor(bias, dtype))
        elif bias_key in state_dict and state_dict[bias_key] is not None:
            raise ValueError(f"{bias_key} is given but layer {prefix} has bias = false")
        out.append(entry)
    return out


def _state_entry(state_dict: Mapping[str, Any], key: str) -> Any:
    if key not in state_dict or state_dict[key] is None:
        raise KeyError(f"state_dict has no {key!r} (keys: {sorted(state_dict)[:8]}...)")
    return state_dict[key]


def state_dict_gradients(model: "pb.Model",
                         response: "pb.ComputeGradientsResponse") -> Dict[str, np.ndarray]:
    """A response's gradients as ``{state_dict key: array}``: chain models by
    ``linear_prefixes`` ("0.weight", "0.bias", ...), graph and ONNX models by parameter name
    (``named_gradients``; ``gradserve.graph.GraphModel.gradients`` also maps tied weights)."""
    if not model.layers:
        return named_arrays(response.named_gradients)
    out: Dict[str, np.ndarray] = {}
    for prefix, grads in zip(linear_prefixes(model), response.gradients):
        out[f"{prefix}.weight"] = from_tensor(grads.weight)
        if grads.HasField("bias"):
            out[f"{prefix}.bias"] = from_tensor(grads.bias)
    return out


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"cannot read the {what} {path}: {error.strerror}") from error


def _check_token(token: str, source: str) -> str:
    """The server's rule for a token: visible ASCII, no spaces (it follows "Bearer ")."""
    if not token:
        raise ValueError(f"{source} is empty")
    if any(not 0x21 <= ord(c) <= 0x7e for c in token):
        raise ValueError(f"{source}: a token may hold only visible ASCII characters (no spaces)")
    return token


def read_token_file(path: str) -> str:
    """The bearer token in ``path``: its content minus trailing newlines, as the server reads
    ``--auth-token-file``. ValueError if the file cannot be read or holds no token."""
    token = _read_file(path, "token file").decode("ascii", errors="replace").rstrip("\r\n")
    return _check_token(token, f"the token file {path}")


class _CallDetails(collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    """A grpc.ClientCallDetails to pass on: gRPC's own class is abstract, without a constructor."""


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to the metadata of every call on the channel.

    Plain metadata rather than grpc.access_token_call_credentials: gRPC refuses call
    credentials on an insecure channel, and a plaintext channel with a token is legitimate behind
    a TLS-terminating proxy (the C++ client makes the same choice).
    """

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(self._header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def connect(target: str, max_message_bytes: int = 256 << 20,
            options: Iterable[Tuple[str, Any]] = (), *,
            tls: bool = False,
            root_ca_file: Optional[str] = None,
            cert_file: Optional[str] = None,
            key_file: Optional[str] = None,
            server_name_override: Optional[str] = None,
            token: Optional[str] = None,
            token_file: Optional[str] = None,
            token_env: Optional[str] = "GRADSERVE_AUTH_TOKEN") -> grpc.Channel:
    """A channel to ``target`` that can send and receive ``max_message_bytes``.

    gRPC clients default to a 4 MiB receive limit, far below what the server accepts (256 MiB
    by default; GetServerInfo reports it), so large gradients would fail on the way back.

    Transport: plaintext unless ``tls`` or any of the TLS files or ``server_name_override`` is
    given. ``root_ca_file``: PEM CAs that signed the server's certificate (default: the system's
    roots). ``cert_file`` + ``key_file``: this client's PEM certificate chain and key, for a server
    with ``--tls-client-ca`` (mutual TLS); both or neither. ``server_name_override``: verify the
    server's certificate against this name instead of the target's host.

    Bearer token, sent as ``authorization: Bearer <token>`` with every call: ``token``, else the
    content of ``token_file`` (trailing newline ignored), else the environment variable named
    ``token_env`` if it is set and not empty; none at all with ``token_env=None``.

    Files are read now: ValueError if one cannot be read, a key comes without its certificate
    (or the reverse), or the token is not visible ASCII.
    """
    channel_options: List[Tuple[str, Any]] = [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
    ]
    tls = tls or any(x is not None for x in (root_ca_file, cert_file, key_file,
                                              server_name_override))
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its private key and a key its certificate: "
                         "give cert_file and key_file together")
    if server_name_override is not None:
        channel_options.append(("grpc.ssl_target_name_override", server_name_override))
    options = list(options)
    # round_robin over every address the target resolves to, and calls refused with
    # UNAVAILABLE (a replica shutting down) retried, on another replica: the shared policy.
    if not any(name == "grpc.service_config" for name, _ in options):
        channel_options.append(("grpc.service_config", service_config()))
    channel_options.extend(options)

    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token is not None:
        bearer = _check_token(token, "token")
    elif token_file is not None:
        bearer = read_token_file(token_file)
    elif token_env is not None and os.environ.get(token_env, "").rstrip("\r\n"):
        bearer = _check_token(os.environ[token_env].rstrip("\r\n"), token_env)
    else:
        bearer = None

    if tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(_read_file(root_ca_file, "TLS root CA file")
                               if root_ca_file is not None else None),
            private_key=_read_file(key_file, "TLS key file") if key_file is not None else None,
            certificate_chain=(_read_file(cert_file, "TLS certificate file")
                               if cert_file is not None else None))
        channel = grpc.secure_channel(target, credentials, options=channel_options)
    else:
        channel = grpc.insecure_channel(target, options=channel_options)
    return channel if bearer is None else grpc.intercept_channel(channel, _BearerToken(bearer))


# The client-side service config every gradserve client should use against several replicas:
# round_robin over every address the target resolves to, and up to 5 attempts (0.1 s, 0.2 s, ...
# backoff, at most 1 s) for calls that fail UNAVAILABLE, e.g. on a replica that is shutting down.
# ONE file, client/service_config.json, so the C++ client can embed the same text; the package
# build copies it next to this module.
SERVICE_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "service_config.json")  # Copied there at build time.


def service_config(path: Optional[str] = None) -> str:
    """The JSON text of ``client/service_config.json`` (or ``path``), validated as JSON, for the
    ``grpc.service_config`` channel option. Retries are on by default in gRPC >= 1.40."""
    import json

    text = _read_file(path or SERVICE_CONFIG_FILE, "service config").decode("utf-8")
    json.loads(text)  # A typo should fail here, not silently disable the policy.
    return text


# grpc.health.v1 by hand: HealthCheckRequest is one string field (1: service) and
# HealthCheckResponse one enum field (1: status). Encoding them here spares a dependency on
# grpcio-health-checking (not packaged by Debian) and a second generated module whose
# "grpc.health.v1" package would clash with it.
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in HealthCheckResponse")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _encode_health_request(service: str) -> bytes:
    name = service.encode("utf-8")
    return b"\x0a" + _varint(len(name)) + name if name else b""


def _decode_health_response(data: bytes) -> str:
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == 2:  # Skip length-delimited fields a later version might add.
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {wire_type} in HealthCheckResponse")
    return _HEALTH_STATUS.get(status, f"UNKNOWN({status})")


def health(channel: grpc.Channel, service: str = "", timeout: float = 10.0) -> str:
    """grpc.health.v1.Health/Check: "SERVING", "NOT_SERVING" (e.g. draining after SIGTERM),
    "SERVICE_UNKNOWN" or "UNKNOWN". ``service``: "" for the server as a whole or
    "gradserve.v1.GradientService". Raises grpc.RpcError if the call fails."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=_encode_health_request,
                                response_deserializer=_decode_health_response)
    return check(service, timeout=timeout)


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


def _layers_of(module, prefix: str = "") -> list:
    """Flattens nested Sequentials so a model built from blocks still maps layer by layer:
    [(state_dict prefix, module)], e.g. ("1.0", Linear) for Sequential(..., Sequential(Linear))."""
    import torch.nn as nn

    if isinstance(module, nn.Sequential):
        return [leaf for name, child in module.named_children()
                for leaf in _layers_of(child, f"{prefix}{name}.")]
    return [(prefix[:-1], module)]


def request_from_sequential(model: Any, loss_name: str, inputs: Any, targets: Any = None, *,
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
    for index, (name, module) in enumerate(layers):
        layer = request.model.layers.add()
        # The state_dict prefix, so that diagnostics and state_dict_gradients use torch's names.
        layer.name = name
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


# --- StreamGradients -----------------------------------------------------------------------------

_END_OF_STREAM = object()


def _linear_parameters(pairs, dtype) -> list:
    """[(weight, bias or None), ...] -> LinearParameters messages in the stream's dtype."""
    out = []
    for weight, bias in pairs:
        entry = pb.LinearParameters(weight=to_tensor(weight, dtype))
        if bias is not None:
            entry.bias.CopyFrom(to_tensor(bias, dtype))
        out.append(entry)
    return out


class TrainingStream:
    """A ``StreamGradients`` stream: the model goes once, then one :meth:`step` per batch.

    ``parameters`` (a list of ``(weight, bias)`` numpy arrays in nn.Linear layout, bias ``None``
    for a bias-less layer) are required on the first step; later steps send either new
    ``parameters`` or an ``update`` (same layout) that the server adds to what it holds, in the
    stream's dtype: ``update = [(-lr * dW, -lr * db), ...]`` is plain SGD. Apply the same
    ``p = p + u`` to your own copy (in the same dtype) and the two stay bit-identical.

    Graph models (``model.graph`` set): ``parameters`` and ``update`` are mappings
    ``{parameter name: array}`` (``named_parameters`` / ``named_parameter_update``; an update
    may name only some parameters), and the batch is ``graph_inputs``, a mapping
    ``{graph input name: array}`` with the loss target among them (floats are sent in the
    stream's dtype, token ids and class targets as they are); ``inputs``, ``targets`` and
    ``output_gradient`` stay unset. ``gradserve.graph.GraphModel.gradients(answer)`` maps
    the answer's ``named_gradients`` back to ``state_dict`` keys.

    ``step`` returns the ``StreamGradientsResponse`` (``.result`` is a
    ``ComputeGradientsResponse``), or ``None`` for ``accumulate=True`` steps, whose gradients
    are summed until the next step without it answers for all of them. Tensors larger than
    ``chunk_bytes`` are sent ahead as ``TensorChunk`` messages, so a step may exceed the
    server's message limit. A server error ends the stream: ``step`` raises ``grpc.RpcError``
    with the server's status (INVALID_ARGUMENT names the message and the field). ``timeout`` is
    the whole stream's deadline in seconds (``None``: none). Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(self, channel: grpc.Channel, model: "pb.Model", dtype: Any = np.float32,
                 options: Optional["pb.ComputeOptions"] = None, *,
                 timeout: Optional[float] = None, chunk_bytes: int = 4 << 20) -> None:
        self._dtype = np.dtype(dtype)
        self._chunk_bytes = max(1, int(chunk_bytes))
        self._outbox: "queue.Queue" = queue.Queue()
        setup = pb.StreamSetup(model=model, dtype=_wire_dtype(self._dtype))
        if options is not None:
            setup.options.CopyFrom(options)
        self._outbox.put(pb.StreamGradientsRequest(setup=setup))
        self._answers = stub(channel).StreamGradients(iter(self._outbox.get, _END_OF_STREAM),
                                                      timeout=timeout)

    def _send_chunked(self, field: str, tensor: "pb.Tensor") -> None:
        data = tensor.data
        for offset in range(0, len(data), self._chunk_bytes):
            chunk = pb.TensorChunk(field=field, data=data[offset:offset + self._chunk_bytes])
            if offset == 0:
                chunk.dtype = tensor.dtype
                chunk.shape.extend(tensor.shape)
            self._outbox.put(pb.StreamGradientsRequest(chunk=chunk))

    def _place(self, step: "pb.StreamStep", field: str, tensor: "pb.Tensor", target) -> None:
        if len(tensor.data) > self._chunk_bytes:
            self._send_chunked(field, tensor)
        else:
            target.CopyFrom(tensor)

    def _place_named(self, field: str, tensors: List["pb.NamedTensor"], target) -> None:
        for named in tensors:
            if len(named.tensor.data) > self._chunk_bytes:
                self._send_chunked(f"{field}[{named.name}]", named.tensor)
            else:
                target.add().CopyFrom(named)

    def step(self, inputs: Any = None, targets: Any = None, *,
             parameters: Optional[Any] = None, update: Optional[Any] = None,
             output_gradient: Any = None, accumulate: bool = False,
             graph_inputs: Optional[Mapping[str, Any]] = None,
             dropout_seed: Optional[int] = None
             ) -> Optional["pb.StreamGradientsResponse"]:
        # dropout_seed (graph models with training-mode Dropout): None lets the server use the
        # step's index on the stream, so each step draws fresh masks, reproducibly.
        if parameters is not None and update is not None:
            raise ValueError("send parameters or an update, not both")
        step = pb.StreamStep(accumulate=accumulate)
        if dropout_seed is not None:
            step.dropout_seed = dropout_seed
        if graph_inputs is not None:
            if inputs is not None or targets is not None or output_gradient is not None:
                raise ValueError("a graph step sends graph_inputs only (the loss target among "
                                 "them), not inputs, targets or output_gradient")
            for name, named in (("named_parameters", parameters),
                                ("named_parameter_update", update)):
                if named is None:
                    continue
                if not isinstance(named, Mapping):
                    raise ValueError(f"graph models take {name} as a mapping "
                                     "{parameter name: array}")
                self._place_named(name, named_tensors(named, self._dtype), getattr(step, name))
            self._place_named("graph_inputs", named_tensors(graph_inputs, self._dtype),
                              step.graph_inputs)
            self._outbox.put(pb.StreamGradientsRequest(step=step))
            return None if accumulate else next(self._answers)
        if inputs is None:
            raise ValueError("a chain step needs inputs (graph models: graph_inputs)")
        for name, pairs in (("parameters", parameters), ("parameter_update", update)):
            if pairs is None:
                continue
            entries = getattr(step, name)
            for index, entry in enumerate(_linear_parameters(pairs, self._dtype)):
                placed = entries.add()
                self._place(step, f"{name}[{index}].weight", entry.weight, placed.weight)
                if entry.HasField("bias"):
                    self._place(step, f"{name}[{index}].bias", entry.bias, placed.bias)
        self._place(step, "inputs", to_tensor(inputs, self._dtype), step.inputs)
        if targets is not None:
            targets = _as_numpy(targets)
            # Class indices stay integers; everything else takes the stream's dtype.
            tensor = (to_tensor(targets) if np.issubdtype(targets.dtype, np.integer)
                      else to_tensor(targets, self._dtype))
            self._place(step, "targets", tensor, step.targets)
        if output_gradient is not None:
            self._place(step, "output_gradient", to_tensor(output_gradient, self._dtype),
                        step.output_gradient)
        self._outbox.put(pb.StreamGradientsRequest(step=step))
        if accumulate:
            return None
        return next(self._answers)

    def close(self) -> None:
        """Half-closes the stream and waits for the server's OK (raises its error if not)."""
        self._outbox.put(_END_OF_STREAM)
        for _ in self._answers:
            pass

    def __enter__(self) -> "TrainingStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._outbox.put(_END_OF_STREAM)
            self._answers.cancel()
