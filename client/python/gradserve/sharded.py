"""Data-parallel gradients from Python: one ComputeGradientsRequest's batch split across
replicas and the answers combined as if one server had computed the whole batch.

The same behaviour as the C++ ``gradserve::client::ShardedClient``
(``client/include/gradserve/sharded_client.h``), so a Python trainer and the optimizer service
get the same numbers from the same split::

    from gradserve import client as gc
    from gradserve.sharded import ShardedClient

    sharded = ShardedClient([gc.connect(a) for a in addresses])   # one channel per replica
    response = sharded.compute_gradients(request, shards=3)
    # or one channel whose round_robin policy spreads the parts over a DNS name's replicas:
    sharded = ShardedClient(gc.connect("dns:///gradserve:50051", options=...), shards=4)

Splitting: chain models split ``inputs``, ``targets`` and ``output_gradient``; graph and ONNX
models every ``graph_inputs`` tensor (the loss target too), all along axis 0, which must have
the same size (the batch) in each. Parameters go whole to every part. B rows in k parts: k
contiguous parts, the first B % k one row larger; k above B is lowered to B.

Combining, in float64 and always in part order (so the bits do not depend on which replica
answered first): REDUCTION_SUM and the external loss add the parts; MEAN weighs part i by n_i,
sum_i(n_i x_i) / sum_i(n_i), with n_i = stats.num_examples, except for graph cross-entropy,
where n_i counts the target positions not equal to ignore_index (parts with none are left out;
none at all gives a NaN loss and zero gradients, as in PyTorch). The result is written in the
dtype of the first part's gradients. The response holds the loss, ``gradients`` or
``named_gradients`` (in the first part's order) and ``stats.num_examples`` (the sum); nothing
else. ``options.return_output``, ``return_input_gradient`` and ``input_gradient_names`` are
refused (INVALID_ARGUMENT): per-row results are not combined. With one part the response is
that call's, unchanged.

Retries: a part failing with UNAVAILABLE or CANCELLED (from a replica shutting down: this
client never cancels a part itself), or DEADLINE_EXCEEDED while the call's deadline is
ahead, goes again to the next channel (part i starts on channel i mod channels) after
``initial_backoff`` seconds, then ``backoff_multiplier`` times longer each time, up to
``max_attempts`` attempts. The first attempt to succeed is the part's answer; nothing is counted
twice. Any other error, or a part out of attempts, fails the call with that part's code and a
message naming it ("shard 1 of 3 (rows 4..6): ..."); with several, the lowest-numbered part.

Channels: the retries here move a part to another replica at once. A channel with a retry
policy of its own (``gradserve.client.connect``'s default service config) first retries on the
replica that failed, ~1.5 s against one that is down; for one channel per replica prefer
``connect(target, options=[("grpc.enable_retries", 0)])``.

Errors are raised as :class:`ShardedError`, a ``grpc.RpcError`` with ``code()`` and
``details()``, so a caller handles them as any other call's.

NOTE: "the same numbers" is exact for float32 models whatever the build: a float32 value times
an integer weight is exact in float64, so C++ code that fuses the multiply-add (FMA, which
gcc does under -march=native) rounds as this unfused one does. For float64 gradients and the
loss under MEAN the two can differ in the last bit when the C++ side was built with FMA.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from gradserve.client import pb, pb_grpc

__all__ = ["ShardedClient", "ShardedCallStats", "ShardedError", "split_rows"]

_ELEMENT_BYTES: Dict["pb.DType", int] = {
    pb.DTYPE_FLOAT32: 4, pb.DTYPE_INT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_INT64: 8,
    pb.DTYPE_BOOL: 1}
_FLOAT_DTYPES: Dict["pb.DType", np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT64: np.dtype("<f8")}


class ShardedError(grpc.RpcError):
    """A failed sharded call: a status code and a message, as a failed gRPC call has."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ShardedCallStats:
    """What one compute_gradients call moved, every part and attempt counted (as the C++
    ShardedCallStats): serialized message bytes, without gRPC's and HTTP/2's framing, and the
    calls made (the parts, plus one per retry)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.attempts = 0

    def __repr__(self) -> str:
        return (f"ShardedCallStats(bytes_sent={self.bytes_sent}, "
                f"bytes_received={self.bytes_received}, attempts={self.attempts})")


def _invalid(message: str) -> ShardedError:
    return ShardedError(grpc.StatusCode.INVALID_ARGUMENT, message)


def split_rows(batch: int, shards: int) -> List[Tuple[int, int]]:
    """[(begin, rows)] of each part: contiguous, the first batch % k parts one row larger."""
    count = min(shards, batch)
    parts: List[Tuple[int, int]] = []
    begin = 0
    for i in range(count):
        rows = batch // count + (1 if i < batch % count else 0)
        parts.append((begin, rows))
        begin += rows
    return parts


def _row_bytes(tensor: "pb.Tensor", field: str) -> int:
    """Bytes of one row of ``tensor``, after checking its data matches its shape (so slicing by
    rows cannot read past it or hand a replica a tensor it would refuse for another reason)."""
    element = _ELEMENT_BYTES.get(tensor.dtype, 0)
    if element == 0:
        raise _invalid(f"{field}: unsupported dtype")
    if len(tensor.shape) < 1 or tensor.shape[0] < 1:
        raise _invalid(f"{field}: needs a leading (batch) axis of size >= 1 to be split")
    elements = 1
    for dim in tensor.shape:
        if dim < 1:
            raise _invalid(f"{field}: bad shape")
        elements *= dim
    if len(tensor.data) != elements * element:
        raise _invalid(f"{field}: data size does not match the shape and dtype")
    return len(tensor.data) // tensor.shape[0]


def _slice(tensor: "pb.Tensor", row_bytes: int, begin: int, rows: int) -> "pb.Tensor":
    return pb.Tensor(dtype=tensor.dtype, shape=[rows, *tensor.shape[1:]],
                     data=tensor.data[begin * row_bytes:(begin + rows) * row_bytes])


def _is_graph(model: "pb.Model") -> bool:
    return model.HasField("graph") or model.HasField("onnx")


def _counted_positions(part: "pb.ComputeGradientsRequest") -> Optional[int]:
    """Graph cross-entropy under MEAN divides by the target positions not ignored, not by the
    batch: the weight the part must get. None when the weight is stats.num_examples."""
    model = part.model
    if not _is_graph(model) or not model.loss.HasField("cross_entropy"):
        return None
    if model.HasField("graph"):
        target = model.graph.loss_target
    else:
        target = model.onnx.loss_target or "target"
    ce = model.loss.cross_entropy
    ignore_index = ce.ignore_index if ce.HasField("ignore_index") else -100
    for named in part.graph_inputs:
        if named.name != target:
            continue
        if named.tensor.dtype == pb.DTYPE_INT64:
            values = np.frombuffer(named.tensor.data, dtype="<i8")
        elif named.tensor.dtype == pb.DTYPE_INT32:
            values = np.frombuffer(named.tensor.data, dtype="<i4")
        else:
            return None  # Not a class target: the server refuses the request anyway.
        return int(np.count_nonzero(values != ignore_index))
    return None


class _Part:
    def __init__(self, index: int, count: int, begin: int, rows: int,
                 request: "pb.ComputeGradientsRequest") -> None:
        self.index, self.count, self.begin, self.rows = index, count, begin, rows
        self.request = request
        self.response: Optional["pb.ComputeGradientsResponse"] = None
        self.error: Optional[grpc.RpcError] = None
        self.stats = ShardedCallStats()

    def name(self) -> str:
        return (f"shard {self.index} of {self.count} "
                f"(rows {self.begin}..{self.begin + self.rows - 1})")

    def result(self) -> "pb.ComputeGradientsResponse":
        """The part's answer once it has run, or its error as a ShardedError."""
        if self.error is not None:
            raise ShardedError(self.error.code(), f"{self.name()}: {self.error.details()}")
        # _run_part makes at least one attempt, and each leaves a response or an error.
        assert self.response is not None, f"{self.name()} has not run"
        return self.response


class ShardedClient:
    """Splits ComputeGradients batches across replicas; see the module docstring. Thread-safe.

    ``replicas``: a list of channels (one per replica) or of stubs (anything with a
    ``ComputeGradients(request, timeout=, metadata=)`` method, e.g. a fake in tests), or one
    channel/stub behind a load balancer, with ``shards`` giving the default number of parts
    (default: the number of replicas).

    ``timeout``: deadline of a whole compute_gradients call in seconds, retries and backoff
    included. ``attempt_timeout``: deadline of each attempt of a part, capped by the call's; a
    part that hits it (a stuck replica) is retried on the next channel while time remains.
    ``token``: a bearer token sent with every part (a channel from ``gradserve.client.connect``
    with a token already sends one).
    """

    def __init__(self, replicas: Union[Any, Sequence[Any]], *, shards: Optional[int] = None,
                 timeout: float = 60.0, attempt_timeout: float = 60.0, max_attempts: int = 4,
                 initial_backoff: float = 0.05, backoff_multiplier: float = 2.0,
                 token: Optional[str] = None) -> None:
        if not isinstance(replicas, (list, tuple)):
            replicas = [replicas]
        self._stubs = [r if hasattr(r, "ComputeGradients") else pb_grpc.GradientServiceStub(r)
                       for r in replicas]
        self._default_shards = shards if shards is not None else len(self._stubs)
        self._timeout = timeout
        self._attempt_timeout = attempt_timeout
        self._max_attempts = max(1, max_attempts)
        self._initial_backoff = initial_backoff
        self._backoff_multiplier = backoff_multiplier
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_threads = 0
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        """Stops the part threads (the channels are the caller's to close)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool, self._pool_threads = None, 0

    def __enter__(self) -> "ShardedClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _executor(self, parts: int) -> concurrent.futures.ThreadPoolExecutor:
        # Parts block on their calls and backoff sleeps, so each needs a thread of its own; the
        # pool is kept between calls and grown when a call has more parts than it has threads.
        with self._pool_lock:
            if self._pool is None or self._pool_threads < parts:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)  # Its running parts still finish.
                self._pool_threads = max(parts, len(self._stubs))
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._pool_threads, thread_name_prefix="gradserve-part")
            return self._pool

    def _run_part(self, part: _Part, deadline: float) -> None:
        backoff = self._initial_backoff
        for attempt in range(self._max_attempts):
            # The first attempt, then each retry on another replica than the one that failed.
            stub = self._stubs[(part.index + attempt) % len(self._stubs)]
            timeout = min(deadline - time.monotonic(), self._attempt_timeout)
            part.stats.attempts += 1
            part.stats.bytes_sent += part.request.ByteSize()
            try:
                response: "pb.ComputeGradientsResponse" = stub.ComputeGradients(
                    part.request, timeout=max(timeout, 0.0), metadata=self._metadata)
                part.response, part.error = response, None
                part.stats.bytes_received += response.ByteSize()
                return
            except grpc.RpcError as error:
                part.response, part.error = None, error
                code = error.code()
            now = time.monotonic()
            retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or (
                code == grpc.StatusCode.DEADLINE_EXCEEDED and now < deadline)
            if not retryable or attempt + 1 == self._max_attempts or now + backoff >= deadline:
                return
            time.sleep(backoff)
            backoff *= self._backoff_multiplier

    def compute_gradients(self, request: "pb.ComputeGradientsRequest",
                          shards: Optional[int] = None,
                          stats: Optional[ShardedCallStats] = None
                          ) -> "pb.ComputeGradientsResponse":
        """``request`` split into ``shards`` parts (default: see the constructor). Raises
        ShardedError: INVALID_ARGUMENT before anything is sent if the batch cannot be split,
        else the failing part's status. ``stats``, if given, is filled in whatever the
        outcome."""
        if stats is not None:
            stats._reset()
        shards = self._default_shards if shards is None else shards
        if not self._stubs:
            raise _invalid("ShardedClient: no channels")
        if shards < 1:
            raise _invalid("ShardedClient: shards must be >= 1")
        options = request.options
        if options.return_output or options.return_input_gradient or \
                len(options.input_gradient_names) > 0:
            raise _invalid("ShardedClient does not combine per-row results: options."
                           "return_output, return_input_gradient and input_gradient_names must "
                           "be unset")

        graph = _is_graph(request.model)
        fields = []  # (setter name or graph input name, tensor, row bytes, field name)
        if graph:
            for i, named in enumerate(request.graph_inputs):
                field = f'graph_inputs[{i}] ("{named.name}")'
                fields.append((named.name, named.tensor, _row_bytes(named.tensor, field), field))
        else:
            if not request.HasField("inputs"):
                raise _invalid("inputs: unset, nothing to split")
            for name in ("inputs", "targets", "output_gradient"):
                if request.HasField(name):
                    tensor = getattr(request, name)
                    fields.append((name, tensor, _row_bytes(tensor, name), name))
        if not fields:
            raise _invalid("graph_inputs: empty, nothing to split")
        batch = fields[0][1].shape[0]
        for _, tensor, _, field in fields[1:]:
            if tensor.shape[0] != batch:
                raise _invalid(f"{field}: leading size {tensor.shape[0]} differs from "
                               f"{fields[0][3]}'s {batch} (every split tensor's first axis is "
                               "the batch)")

        base = pb.ComputeGradientsRequest()
        base.CopyFrom(request)
        for name in ("inputs", "targets", "output_gradient", "graph_inputs"):
            base.ClearField(name)
        layout = split_rows(batch, shards)
        parts = []
        for index, (begin, rows) in enumerate(layout):
            part_request = pb.ComputeGradientsRequest()
            part_request.CopyFrom(base)
            for name, tensor, row_bytes, _ in fields:
                piece = _slice(tensor, row_bytes, begin, rows)
                if graph:
                    part_request.graph_inputs.add(name=name, tensor=piece)
                else:
                    getattr(part_request, name).CopyFrom(piece)
            parts.append(_Part(index, len(layout), begin, rows, part_request))

        deadline = time.monotonic() + self._timeout
        if len(parts) == 1:
            self._run_part(parts[0], deadline)
        else:
            pool = self._executor(len(parts))
            futures = [pool.submit(self._run_part, part, deadline) for part in parts]
            for future in futures:
                future.result()
        if stats is not None:
            for part in parts:
                stats.bytes_sent += part.stats.bytes_sent
                stats.bytes_received += part.stats.bytes_received
                stats.attempts += part.stats.attempts
        responses = [part.result() for part in parts]  # Raises the first part's error.

        # One part is the plain call: its answer unchanged (weighing by n and dividing by n
        # again could change the last bit).
        if len(parts) == 1:
            return responses[0]
        return _combine(request, parts, responses)


def _combine(request: "pb.ComputeGradientsRequest", parts: List[_Part],
             responses: List["pb.ComputeGradientsResponse"]) -> "pb.ComputeGradientsResponse":
    loss = request.model.loss
    mean = not loss.HasField("external") and loss.reduction != pb.REDUCTION_SUM
    weights = [1.0] * len(parts)
    total = 0.0 if mean else 1.0
    num_examples = 0
    for i, part in enumerate(parts):
        num_examples += responses[i].stats.num_examples
        if mean:
            counted = _counted_positions(part.request)
            weights[i] = float(counted if counted is not None
                               else responses[i].stats.num_examples)
            total += weights[i]
    # A part whose every position is ignored has a NaN loss and zero gradients: left out, it
    # adds nothing, as in one call over the whole batch.
    counts = [not mean or w > 0 for w in weights]

    def disagree(what: str, i: int, error: str) -> ShardedError:
        return ShardedError(grpc.StatusCode.INTERNAL,
                            f"ShardedClient: {what} of {parts[i].name()}: {error}")

    def combine(tensors: List["pb.Tensor"], what: str) -> "pb.Tensor":
        first = tensors[0]
        if first.dtype not in _FLOAT_DTYPES:
            raise disagree(what, 0, "not a floating tensor")
        wire = _FLOAT_DTYPES[first.dtype]
        # From +0.0, as the C++ sum starts: a first term of -0.0 then ends as +0.0 there too.
        acc = np.zeros(len(first.data) // wire.itemsize)
        for i, tensor in enumerate(tensors):
            if not counts[i]:
                continue
            if tensor.dtype != first.dtype or list(tensor.shape) != list(first.shape) or \
                    len(tensor.data) != len(first.data):
                raise disagree(what, i, "dtype or shape differs from shard 0's")
            # The product is rounded, then the sum: no fused multiply-add, so the bits do not
            # depend on the CPU numpy runs on.
            term = np.frombuffer(tensor.data, dtype=wire).astype(np.float64) * weights[i]
            acc = acc + term
        # No part counted (every position ignored): zero gradients, as PyTorch gives.
        out = (acc / total if total > 0 else acc).astype(wire)
        return pb.Tensor(dtype=first.dtype, shape=list(first.shape), data=out.tobytes())

    response = pb.ComputeGradientsResponse()
    loss_sum = 0.0
    for i, answer in enumerate(responses):
        if counts[i]:
            loss_sum += weights[i] * answer.loss
    response.loss = loss_sum / total if total > 0 else float("nan")

    first = responses[0]
    for layer in range(len(first.gradients)):
        for i, answer in enumerate(responses):
            if len(answer.gradients) != len(first.gradients):
                raise disagree("gradients", i, "a different number of layer gradients")
        out = response.gradients.add()
        what = f"gradients[{layer}]"
        out.weight.CopyFrom(combine([r.gradients[layer].weight for r in responses],
                                    what + ".weight"))
        if first.gradients[layer].HasField("bias"):
            out.bias.CopyFrom(combine([r.gradients[layer].bias for r in responses],
                                      what + ".bias"))

    by_name = []
    for i, answer in enumerate(responses):
        named = answer.named_gradients
        if len(named) != len(first.named_gradients):
            raise disagree("named_gradients", i, "a different number of named gradients")
        by_name.append({g.name: g.tensor for g in named})
    for named in first.named_gradients:
        for i in range(len(parts)):
            if named.name not in by_name[i]:
                raise disagree("named_gradients", i, f'no gradient for "{named.name}"')
        response.named_gradients.add(
            name=named.name,
            tensor=combine([by_name[i][named.name] for i in range(len(parts))],
                           f'named_gradients["{named.name}"]'))
    response.stats.num_examples = num_examples
    return response
