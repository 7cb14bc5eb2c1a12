"""Graph models for gradserve: a ``gradserve.v1.Graph`` written by hand or traced from torch.

* ``GraphBuilder``: inputs, parameters, constants and ONNX-named nodes, then a ``pb.Model``;
  needs only numpy (the unit tests use it without torch).
* ``from_module(module, example_inputs, loss=...)``: a ``GraphModel`` computing what
  ``loss(module(*inputs), targets)`` computes, by torch.fx symbolic tracing (torch 1.13).
* ``GraphModel``: the ``pb.Model`` plus the ``state_dict`` mapping both ways:
  ``named_parameters(module or state_dict)`` -> the request's ``named_parameters``,
  ``gradients(response)`` -> ``{state_dict key: array}``, ``request(...)`` -> a whole
  ``ComputeGradientsRequest``.

Tracing, in short (Note [Tracing]): every fx node becomes zero or more ONNX opset-17 nodes.
Parameters keep their ``state_dict`` names ("blocks.0.mlp.fc.weight", nn.Linear's [out, in]
layout); a tied parameter (an LM head sharing the token embedding) is one graph parameter under
its first name, and ``gradients`` reports it under every ``state_dict`` key that holds it.
Buffers and frozen parameters are constants. Anything computed from constants and sizes alone
(``torch.arange``, the causal mask ``self.bias[:, :, :T, :T] == 0``) is evaluated here, in
torch, and sent as a constant. Sizes read with ``x.size()`` are those of the example inputs,
as in ``torch.onnx.export`` without dynamic axes, except the batch (leading) size where the
graph can take any (Note [Batch size]; ``GraphModel.batch_flexible``): trace again for another
sequence length. What has no equivalent (a module, a function, a method, an argument) raises
``UnsupportedError`` naming the fx node and the line of the model's code.

Modules: Sequential and any container (traced through), Linear, LayerNorm, Embedding (Gather),
GELU (exact and tanh), ReLU, LeakyReLU, Tanh, Sigmoid, Softmax, Identity, Dropout (dropped in
eval mode or at p = 0; in training mode only with ``dropout_seed``: the server's masks are a
hash of the seed, not torch's RNG, so they differ from torch's). Functions and methods: + - * /
(numpy broadcasting, Python scalars included), neg, pow by a constant, matmul / @ / bmm,
exp, sqrt, rsqrt, erf, tanh, sigmoid, relu, gelu, leaky_relu, softmax, layer_norm, linear,
embedding, dropout, transpose, permute, t, view, reshape, flatten, contiguous, squeeze,
unsqueeze, split, chunk, cat, basic indexing (ints and slices with step >= 1), masked_fill and
torch.where with a constant mask (-> Where with a bool constant), mean and sum over dims.
"""

from __future__ import annotations

import operator
from typing import (Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Set,
                    Tuple, Union)

import numpy as np

from gradserve import client as gc
from gradserve.client import pb

__all__ = ["GraphBuilder", "GraphModel", "UnsupportedError", "from_module", "graph_tensor",
           "named_tensors", "named_arrays"]


class UnsupportedError(ValueError):
    """A module, function, method or argument with no gradserve graph equivalent."""


graph_tensor = gc.graph_tensor
named_tensors = gc.named_tensors
named_arrays = gc.named_arrays
_from_graph_tensor = gc.from_graph_tensor


_INPUT_DTYPES = {
    np.dtype(np.float32): pb.DTYPE_FLOAT32,
    np.dtype(np.float64): pb.DTYPE_FLOAT64,
    np.dtype(np.int32): pb.DTYPE_INT32,
    np.dtype(np.int64): pb.DTYPE_INT64,
}


def _attribute(name: str, value: Any) -> "pb.Attribute":
    """A Python value as an ONNX-typed attribute: int -> i, float -> f, str -> s, a sequence of
    ints -> ints, of floats -> floats, an array -> t (Constant's value)."""
    attribute = pb.Attribute(name=name)
    if isinstance(value, (bool, int, np.integer)):
        attribute.i = int(value)
    elif isinstance(value, (float, np.floating)):
        attribute.f = float(value)
    elif isinstance(value, str):
        attribute.s = value
    elif isinstance(value, np.ndarray):
        attribute.t.CopyFrom(graph_tensor(value))
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (bool, int, np.integer)) for v in value):
            attribute.ints.values.extend(int(v) for v in value)
        elif all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            attribute.floats.values.extend(float(v) for v in value)
        else:
            raise TypeError(f"attribute {name!r}: a list of ints or of floats, got {value!r}")
    else:
        raise TypeError(f"attribute {name!r}: unsupported value {value!r}")
    return attribute


class GraphBuilder:
    """Writes a ``pb.Graph`` a value at a time (numpy only).

        b = GraphBuilder()
        x = b.input("x", np.float64)
        t = b.input("targets", np.float64)
        b.parameter("fc.weight", (3, 4)); b.parameter("fc.bias", (3,))
        y = b.node("Gemm", [x, "fc.weight", "fc.bias"], transB=1)
        model = b.model(loss=gc.loss("mse"), output=y, target=t)

    ``node`` returns its output name (a list of names if ``outputs`` is a count > 1); outputs
    are named ``<name or op_type>/<k>`` unless given. Constants with identical dtype, shape and
    bytes are sent once.
    """

    def __init__(self) -> None:
        self.graph = pb.Graph()
        self._names: Set[str] = set()
        self._constants: Dict[tuple, str] = {}
        self._counter = 0

    def fresh(self, base: str) -> str:
        """A value name not used yet: ``base``, else ``base#2``, ``base#3``, ..."""
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}#{k}"
        return name

    def _define(self, name: str) -> str:
        if not name:
            raise ValueError("value names must be non-empty")
        if name in self._names:
            raise ValueError(f"value {name!r} is defined twice")
        self._names.add(name)
        return name

    def input(self, name: str, dtype: Any) -> str:
        key = np.dtype(dtype)
        if key not in _INPUT_DTYPES:
            raise ValueError(f"graph input {name!r}: dtype {key} (float32, float64, int32, int64)")
        self.graph.inputs.add(name=self._define(name), dtype=_INPUT_DTYPES[key])
        return name

    def parameter(self, name: str, shape: Sequence[int]) -> str:
        self.graph.parameters.add(name=self._define(name), shape=[int(s) for s in shape])
        return name

    def has(self, name: str) -> bool:
        return name in self._names

    def constant(self, value: Any, name: Optional[str] = None) -> str:
        """A constant (float data is sent as float64 and converted by the server to the request's
        dtype; ints as int64; bools as DTYPE_BOOL). Returns its name."""
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(np.float64)
        elif array.dtype.kind in "iu":
            array = array.astype(np.int64)
        elif array.dtype != np.bool_:
            raise ValueError(f"constant {name!r}: dtype {array.dtype} is not float, int or bool")
        array = np.array(array, order="C")  # (ascontiguousarray would make a scalar [1])
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in self._constants:
            return self._constants[key]
        if name is None:
            self._counter += 1
            name = f"const/{self._counter}"
        name = self._define(self.fresh(name))
        self.graph.constants.add(name=name, tensor=graph_tensor(array))
        self._constants[key] = name
        return name

    def node(self, op_type: str, inputs: Sequence[str], outputs: Union[int, Sequence[str]] = 1,
             name: str = "", **attributes: Any) -> Union[str, List[str]]:
        if isinstance(outputs, int):
            base = name or op_type
            count = outputs
            outputs = [self.fresh(base if count == 1 else f"{base}/{k}") for k in range(count)]
        else:
            count = -1
        for output in outputs:
            self._define(output)
        node = self.graph.nodes.add(name=name, op_type=op_type, inputs=list(inputs),
                                    outputs=list(outputs))
        for key, value in attributes.items():
            node.attributes.append(_attribute(key, value))
        return outputs[0] if count == 1 else list(outputs)

    def model(self, loss: "pb.Loss", output: str, target: str,
              outputs: Sequence[str] = ()) -> "pb.Model":
        """The Model: this graph, ``loss`` on ``output`` against the input ``target``; graph
        outputs ``output`` then ``outputs``."""
        graph = pb.Graph()
        graph.CopyFrom(self.graph)
        graph.outputs.append(output)
        graph.outputs.extend(o for o in outputs if o != output)
        graph.loss_output = output
        graph.loss_target = target
        return pb.Model(graph=graph, loss=loss)


class GraphModel:
    """A traced module: the ``pb.Model`` and the state_dict mapping.

    Attributes: ``model`` (pb.Model with ``graph`` and ``loss``), ``dtype`` (numpy floating
    dtype of the float graph inputs), ``parameter_names`` (graph parameters, in the order
    ``named_gradients`` come back), ``aliases`` ({state_dict key: graph parameter name}, every
    key holding a traced parameter, tied copies included), ``unused_parameters`` (trainable
    state_dict keys the traced computation never reads: torch gives them no gradient, and the
    graph cannot declare them), ``input_names`` (the module's forward arguments, in order),
    ``target_name``, ``output_name``, ``batch_flexible`` (True: the graph takes any leading
    size of its inputs, Note [Batch size]; False: only the example's).
    """

    batch_flexible = False

    def __init__(self, model: "pb.Model", dtype: Any, parameter_names: Sequence[str],
                 aliases: Mapping[str, str], unused: Sequence[str], input_names: Sequence[str],
                 target_name: str, output_name: str,
                 parameter_shapes: Mapping[str, Tuple[int, ...]]) -> None:
        self.model = model
        self.dtype = np.dtype(dtype)
        self.parameter_names = list(parameter_names)
        self.aliases = dict(aliases)
        self.unused_parameters = list(unused)
        self.input_names = list(input_names)
        self.target_name = target_name
        self.output_name = output_name
        self.parameter_shapes = dict(parameter_shapes)

    @property
    def graph(self) -> "pb.Graph":
        return self.model.graph

    def model_for(self, dtype: Any) -> "pb.Model":
        """``model`` with its floating graph inputs declared in ``dtype`` (float32 or
        float64): one traced graph serves both precisions."""
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {np.dtype(dtype)}")
        wire = _INPUT_DTYPES[np.dtype(dtype)]
        model = pb.Model()
        model.CopyFrom(self.model)
        for graph_input in model.graph.inputs:
            if graph_input.dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64):
                graph_input.dtype = wire
        return model

    def parameter_arrays(self, source: Any, dtype: Any = None) -> Dict[str, np.ndarray]:
        """{graph parameter name: numpy array} from a torch module, a state_dict, or any mapping
        holding at least the graph parameters' names (extra keys such as tied aliases and
        buffers are ignored), converted to ``dtype`` (default: this model's)."""
        if hasattr(source, "state_dict") and callable(source.state_dict):
            source = source.state_dict()
        dtype = np.dtype(dtype or self.dtype)
        out = {}
        for name in self.parameter_names:
            if name not in source:
                raise KeyError(f"parameter {name!r} missing from the given state_dict")
            array = gc._as_numpy(source[name]).astype(dtype, copy=False)
            if tuple(array.shape) != self.parameter_shapes[name]:
                raise ValueError(f"parameter {name!r}: shape {list(array.shape)}, the graph "
                                 f"declares {list(self.parameter_shapes[name])}")
            out[name] = array
        return out

    def named_parameters(self, source: Any, dtype: Any = None) -> List["pb.NamedTensor"]:
        """The request's ``named_parameters`` (see ``parameter_arrays``)."""
        dtype = np.dtype(dtype or self.dtype)
        return named_tensors(self.parameter_arrays(source, dtype), dtype)

    def input_arrays(self, inputs: Any, targets: Any = None) -> Dict[str, Any]:
        """{graph input name: array}: ``inputs`` a mapping by forward-argument name, a tuple in
        forward order, or one array; ``targets`` the loss target."""
        if isinstance(inputs, Mapping):
            arrays = dict(inputs)
        else:
            if not isinstance(inputs, (tuple, list)):
                inputs = (inputs,)
            if len(inputs) != len(self.input_names):
                raise ValueError(f"expected {len(self.input_names)} inputs "
                                 f"{self.input_names}, got {len(inputs)}")
            arrays = dict(zip(self.input_names, inputs))
        if targets is not None:
            arrays[self.target_name] = targets
        return arrays

    def graph_inputs(self, inputs: Any, targets: Any = None,
                     dtype: Any = None) -> List["pb.NamedTensor"]:
        """The request's ``graph_inputs`` (see ``input_arrays``); floats in ``dtype``."""
        return named_tensors(self.input_arrays(inputs, targets), np.dtype(dtype or self.dtype))

    def request(self, parameters: Any, inputs: Any, targets: Any, *, dtype: Any = None,
                return_output: bool = False, input_gradients: Sequence[str] = (),
                checkpoint: Optional["pb.Checkpointing"] = None,
                allow_non_finite: bool = False,
                dropout_seed: int = 0) -> "pb.ComputeGradientsRequest":
        """A ComputeGradientsRequest: ``parameters`` a module or state_dict (see
        ``parameter_arrays``), ``inputs``/``targets`` as ``input_arrays``; ``input_gradients``
        names float graph inputs whose dL/d(input) to return. ``dtype`` (default: the traced
        one) is the request's floating dtype (see ``model_for``). ``dropout_seed``: send a new
        one per call (a step counter) for fresh training-mode Dropout masks."""
        dtype = np.dtype(dtype or self.dtype)
        request = pb.ComputeGradientsRequest(
            model=self.model if dtype == self.dtype else self.model_for(dtype))
        request.named_parameters.extend(self.named_parameters(parameters, dtype))
        request.graph_inputs.extend(self.graph_inputs(inputs, targets, dtype))
        options = request.options
        options.return_output = return_output
        options.allow_non_finite = allow_non_finite
        options.dropout_seed = dropout_seed
        options.input_gradient_names.extend(input_gradients)
        if checkpoint is not None:
            options.checkpointing.CopyFrom(checkpoint)
        return request

    def gradients(self, response: Any, *, as_torch: bool = False,
                  aliases: bool = True) -> Dict[str, Any]:
        """``named_gradients`` (of a ComputeGradientsResponse, a StreamGradientsResponse, or the
        NamedTensors themselves) -> {state_dict key: gradient}, numpy arrays (torch tensors with
        ``as_torch``). With ``aliases`` every state_dict key of a tied parameter gets its (one,
        summed) gradient, as ``p.grad`` would show it under each name."""
        if hasattr(response, "result"):
            response = response.result
        tensors = response.named_gradients if hasattr(response, "named_gradients") else response
        grads = named_arrays(tensors)
        if as_torch:
            import torch
            grads = {k: torch.from_numpy(v) for k, v in grads.items()}
        if not aliases:
            return grads
        return {key: grads[name] for key, name in self.aliases.items() if name in grads}


# --- Tracing ---------------------------------------------------------------------------------
#
# Note [Tracing]
# torch.fx records the module's forward as a graph of placeholder / get_attr / call_module /
# call_function / call_method / output nodes (standard torch.nn modules stay whole). _Tracer
# walks it in order, with an environment mapping each fx node to
#   * a _Value: a tensor the server computes (an input, a parameter, a node output), with its
#     example tensor (the same op run in torch on the example inputs, for shapes and dtypes), or
#   * a _Value that is constant: its data known here (buffers, frozen parameters, anything
#     computed from constants and sizes only), sent as a graph constant only once a server-side
#     op reads it, or
#   * a plain Python object (sizes, tuples of values from split/chunk, devices, dtypes).
# An fx node reading no server-side value is evaluated here (that is how the causal mask and
# the positions become constants); one reading a server-side value goes to its handler, which
# writes ONNX nodes and returns the result _Value(s).


class _Value:
    __slots__ = ("name", "example", "const")

    def __init__(self, name: Optional[str], example: Any, const: bool = False) -> None:
        self.name = name          # graph value name (None: a constant not sent yet)
        self.example = example    # torch tensor: the data itself for constants
        self.const = const

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.example.shape)

    @property
    def rank(self) -> int:
        return self.example.dim()


def _walk(obj, fn):
    """``obj`` with ``fn`` applied to every leaf of its tuples, lists, dicts and slices."""
    if isinstance(obj, (list, tuple)):
        items = [_walk(o, fn) for o in obj]
        if hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except TypeError:  # torch.Size of non-ints
            return tuple(items)
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_walk(obj.start, fn), _walk(obj.stop, fn), _walk(obj.step, fn))
    return fn(obj)


def _any_live(obj) -> bool:
    """Does ``obj`` hold a value the server computes (not a constant)?"""
    if isinstance(obj, _Value):
        return not obj.const
    if isinstance(obj, (list, tuple)):
        return any(_any_live(o) for o in obj)
    if isinstance(obj, dict):
        return any(_any_live(o) for o in obj.values())
    if isinstance(obj, slice):
        return any(_any_live(o) for o in (obj.start, obj.stop, obj.step))
    return False


def _bind(args, kwargs, names: Sequence[str], defaults: Mapping[str, Any], what: str) -> dict:
    """Positional and keyword arguments against a signature ``names`` (first is the tensor)."""
    if len(args) > len(names):
        raise UnsupportedError(f"{what}: {len(args)} positional arguments, expected at most "
                               f"{len(names)} ({', '.join(names)})")
    bound = dict(defaults)
    bound.update(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise UnsupportedError(f"{what}: unsupported argument {key}={value!r}")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise UnsupportedError(f"{what}: missing argument(s) {missing}")
    return bound


def _shape_args(args) -> List[int]:
    """view(2, 3) / view((2, 3)) / view([2, 3]) -> [2, 3]."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    if hasattr(args, "__iter__") and not isinstance(args, (tuple, list)):  # torch.Size
        args = list(args)
    return [int(a) for a in args]


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _unary_op(onnx: str) -> Callable[..., Any]:
    """A _Tracer handler writing one ``onnx`` node (a module-level function: defined in the
    class body, mypy would take ``onnx`` for ``self``)."""
    def handler(self: "_Tracer", example: Any, x: Any, *args: Any, **kwargs: Any) -> "_Value":
        if args or kwargs:
            self.fail(f"{onnx} with extra arguments {args} {kwargs}")
        return self.emit(onnx, [x], example)
    return handler


class _Tracer:
    def __init__(self, module: Any, example_inputs: Dict[str, Any], float_dtype: Any,
                 dropout_seed: Optional[int], builder: GraphBuilder) -> None:
        import torch
        self.torch = torch
        self.module = module
        self.examples = example_inputs
        self.float_dtype = float_dtype
        self.dropout_seed = dropout_seed
        self.dropout_count = 0
        self.b = builder
        self.modules = dict(module.named_modules())
        # First name of each trainable parameter (named_parameters drops tied duplicates).
        self.param_name = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
        self.used_params: Dict[str, Tuple[int, ...]] = {}
        self.node: Any = None  # the torch.fx.Node being converted (for messages)
        # Reshape nodes written: (index in graph.nodes, target shape, input shape).
        self.reshapes: List[Tuple[int, List[int], List[int]]] = []

    # -- values --------------------------------------------------------------------------

    def where(self) -> str:
        node = self.node
        target = node.target if isinstance(node.target, str) else \
            getattr(node.target, "__name__", repr(node.target))
        text = f"fx node {node.name!r} ({node.op} {target})"
        trace = getattr(node, "stack_trace", None)
        if trace:  # innermost frame first: the line of the model's forward
            lines = [l.strip() for l in trace.strip().splitlines() if l.strip()]
            if len(lines) >= 2 and lines[0].startswith("File "):
                text += f" at {lines[0]}: {lines[1]}"
        return text

    def fail(self, message: str) -> NoReturn:
        raise UnsupportedError(f"{self.where()}: {message}")

    def name_of(self, v: "_Value") -> str:
        """The graph value name, sending a constant the first time a node reads it."""
        if v.name is None:
            data = v.example.detach().cpu().numpy()
            v.name = self.b.constant(data, f"{self.node.name}/const")
        return v.name

    def const(self, value, like: Optional["_Value"] = None) -> "_Value":
        """A Python number or array as a constant value (floats as float data)."""
        if isinstance(value, self.torch.Tensor):
            t = value
        else:  # numpy first: torch.as_tensor would round a Python float to float32
            t = self.torch.from_numpy(np.array(value))
        if t.is_floating_point() or (like is not None and like.example.is_floating_point()
                                     and t.dtype != self.torch.bool):
            t = t.to(self.float_dtype)
        return _Value(None, t, const=True)

    def as_value(self, x, like: Optional["_Value"] = None) -> "_Value":
        if isinstance(x, _Value):
            return x
        if isinstance(x, (int, float, bool)) or hasattr(x, "dtype"):
            return self.const(x, like)
        self.fail(f"expected a tensor or a number, got {x!r}")

    def param(self, p) -> "_Value":
        name = self.param_name.get(id(p))
        if name is None:  # frozen: a constant
            return _Value(None, p.detach(), const=True)
        if not self.b.has(name):
            self.b.parameter(name, tuple(p.shape))
            self.used_params[name] = tuple(p.shape)
        return _Value(name, p.detach())

    def emit(self, op_type: str, inputs: Sequence[Any], example, outputs: int = 1,
             suffix: str = "", **attributes):
        """Adds a node reading ``inputs`` (_Values or names); returns its _Value(s)."""
        names = [self.name_of(i) if isinstance(i, _Value) else i for i in inputs]
        base = self.node.name + (f"/{suffix}" if suffix else "")
        if outputs == 1:
            out = [self.b.fresh(base)]
        else:
            out = [self.b.fresh(f"{base}/{k}") for k in range(outputs)]
        self.b.node(op_type, names, outputs=out, name=self.node_label(), **attributes)
        if outputs == 1:
            return _Value(out[0], example)
        return [_Value(n, e) for n, e in zip(out, example)]

    def node_label(self) -> str:
        node = self.node
        if node.op == "call_module":
            return node.target
        return node.name

    # -- the walk ------------------------------------------------------------------------

    def run(self, graph: Any) -> Any:
        """The forward's result: a _Value, or what holds them (a tuple for output_index)."""
        torch = self.torch
        env: Dict[Any, Any] = {}
        result: Any = None
        with torch.no_grad():
            for node in graph.nodes:
                self.node = node
                if node.op == "placeholder":
                    if node.target not in self.examples:
                        self.fail(f"no example input for forward argument {node.target!r}")
                    example = torch.as_tensor(self.examples[node.target])
                    if example.is_floating_point():
                        example = example.to(self.float_dtype)
                    env[node] = _Value(self.b.input(node.target, example.numpy().dtype), example)
                    continue
                args = _walk(node.args, lambda a: env[a] if a in env else a)
                kwargs = _walk(dict(node.kwargs), lambda a: env[a] if a in env else a)
                if node.op == "get_attr":
                    env[node] = self.get_attr(node.target)
                elif node.op == "output":
                    result = args[0]
                elif node.op == "call_module":
                    env[node] = self.call_module(node.target, args, kwargs)
                elif node.op in ("call_function", "call_method"):
                    env[node] = self.call(node.op, node.target, args, kwargs)
                else:
                    self.fail("unknown fx node kind")
        return result

    def get_attr(self, target: str):
        obj = self.module
        for part in target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, self.torch.nn.Parameter):
            return self.param(obj)
        if isinstance(obj, self.torch.Tensor):
            return _Value(None, obj.detach(), const=True)
        return obj

    def evaluate(self, op: str, target, args, kwargs):
        """Runs the op in torch on examples (constants' data, server values' example data)."""
        def unwrap(o):
            return o.example if isinstance(o, _Value) else o
        args = _walk(args, unwrap)
        kwargs = _walk(kwargs, unwrap)
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def call(self, op: str, target, args, kwargs):
        if not _any_live((args, kwargs)):
            # Constants and sizes only: computed here. Tensors become constants.
            result = self.evaluate(op, target, args, kwargs)
            return _walk(result, lambda r: _Value(None, r, const=True)
                         if isinstance(r, self.torch.Tensor) else r)
        key = target if op == "call_method" else _FUNCTION_KEYS.get(target)
        if key is None:
            key = getattr(target, "__name__", None)
            hint = ""
            if key and ("loss" in key or "entropy" in key):
                hint = ("; compute the loss outside forward and name it in from_module(loss=...),"
                        " as a Loss message applies it to the graph's output")
            self.fail(f"function {getattr(target, '__module__', '')}.{key} has no gradserve "
                      f"equivalent{hint}")
        handler = getattr(self, f"op_{key}", None)
        if handler is None:
            self.fail(f"{'method' if op == 'call_method' else 'function'} {key!r} has no "
                      "gradserve equivalent")
        example = self.evaluate(op, target, args, kwargs)
        return handler(example, *args, **kwargs)

    # -- modules -------------------------------------------------------------------------

    def call_module(self, target: str, args, kwargs):
        nn = self.torch.nn
        m = self.modules[target]
        trainable = any(p.requires_grad for p in m.parameters())
        if not trainable and not _any_live((args, kwargs)):
            result = m(*_walk(args, lambda o: o.example if isinstance(o, _Value) else o),
                       **kwargs)
            return _walk(result, lambda r: _Value(None, r, const=True)
                         if isinstance(r, self.torch.Tensor) else r)
        if kwargs or len(args) != 1:
            self.fail(f"{type(m).__name__} called with {len(args)} positional arguments and "
                      f"{sorted(kwargs)}: expected one tensor")
        x = args[0]
        example = m(x.example)
        if isinstance(m, nn.Linear):
            return self.linear(example, x, self.param(m.weight),
                               None if m.bias is None else self.param(m.bias))
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(example, x, tuple(m.normalized_shape),
                                   self.param(m.weight) if m.elementwise_affine else None,
                                   self.param(m.bias) if m.elementwise_affine else None, m.eps)
        if isinstance(m, nn.Embedding):
            if m.padding_idx is not None or m.max_norm is not None or m.scale_grad_by_freq \
                    or m.sparse:
                self.fail("Embedding with padding_idx, max_norm, scale_grad_by_freq or sparse "
                          "is not supported (the server's Gather gradient is a plain "
                          "scatter-add)")
            return self.emit("Gather", [self.param(m.weight), x], example, axis=0)
        if isinstance(m, nn.GELU):
            return self.gelu(example, x, m.approximate)
        if isinstance(m, nn.ReLU):
            return self.emit("Relu", [x], example)
        if isinstance(m, nn.LeakyReLU):
            return self.emit("LeakyRelu", [x], example, alpha=float(m.negative_slope))
        if isinstance(m, nn.Tanh):
            return self.emit("Tanh", [x], example)
        if isinstance(m, nn.Sigmoid):
            return self.emit("Sigmoid", [x], example)
        if isinstance(m, nn.Softmax):
            return self.emit("Softmax", [x], example, axis=-1 if m.dim is None else int(m.dim))
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, nn.Dropout):
            return self.dropout(example, x, m.p, m.training)
        self.fail(f"module {target!r} ({type(m).__module__}.{type(m).__name__}) has no gradserve "
                  "equivalent; supported: Sequential and other containers, Linear, LayerNorm, "
                  "Embedding, GELU, ReLU, LeakyReLU, Tanh, Sigmoid, Softmax, Identity, Dropout")

    # -- shared conversions --------------------------------------------------------------

    def linear(self, example, x, weight, bias):
        """nn.Linear: Gemm(x, W, b, transB=1) for a matrix; for higher ranks what torch.onnx
        exports, MatMul(x, Transpose(W)) + b, which the server fuses into one GEMM."""
        if x.rank == 2:
            inputs = [x, weight] + ([bias] if bias is not None else [])
            return self.emit("Gemm", inputs, example, transB=1)
        wt = self.emit("Transpose", [weight], weight.example.t(), suffix="weight_t", perm=[1, 0])
        if bias is None:
            return self.emit("MatMul", [x, wt], example)
        mm = self.emit("MatMul", [x, wt], example, suffix="mm")
        return self.emit("Add", [mm, bias], example)

    def layer_norm(self, example, x, normalized_shape, weight, bias, eps):
        if weight is None:
            weight = self.const(np.ones(normalized_shape))
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return self.emit("LayerNormalization", inputs, example, axis=-len(normalized_shape),
                         epsilon=float(eps))

    def gelu(self, example, x, approximate="none"):
        if approximate not in ("none", "tanh"):
            self.fail(f"GELU(approximate={approximate!r})")
        return self.emit("Gelu", [x], example, approximate=approximate)

    def dropout(self, example, x, p, training):
        if not training or p == 0:
            return x
        if self.dropout_seed is None:
            self.fail(f"Dropout(p={p}) in training mode: call module.eval() (or p=0), or pass "
                      "dropout_seed= (the server draws its own masks from the seed, not from "
                      "torch's generator)")
        if p >= 1:
            self.fail("Dropout with p >= 1")
        seed = int(self.dropout_seed) + self.dropout_count
        self.dropout_count += 1
        return self.emit("Dropout", [x, self.const(np.float64(p)), self.const(np.bool_(True))],
                         example, seed=seed)

    def binary(self, op_type, example, a, b):
        if not isinstance(a, _Value) and not isinstance(b, _Value):
            self.fail("arithmetic without a tensor")
        like = a if isinstance(a, _Value) else b
        if not like.example.is_floating_point():
            self.fail("arithmetic on integer tensors runs on the server only for constants")
        operands = []
        for operand in (a, b):
            operand = self.as_value(operand, like)
            if operand.const and not operand.example.is_floating_point():
                operand = _Value(None, operand.example.to(self.float_dtype), const=True)
            operands.append(operand)
        return self.emit(op_type, operands, example)

    # -- functions and methods -----------------------------------------------------------
    # op_<key>(example, *args, **kwargs); key from _FUNCTION_KEYS or the method's name.

    def op_add(self, example, a, b, alpha=1):
        if alpha != 1:
            self.fail("add with alpha")
        return self.binary("Add", example, a, b)

    def op_sub(self, example, a, b, alpha=1):
        if alpha != 1:
            self.fail("sub with alpha")
        return self.binary("Sub", example, a, b)

    def op_mul(self, example, a, b):
        return self.binary("Mul", example, a, b)

    def op_truediv(self, example, a, b, rounding_mode=None):
        if rounding_mode is not None:
            self.fail(f"div with rounding_mode={rounding_mode!r}")
        return self.binary("Div", example, a, b)

    op_div = op_truediv

    def op_neg(self, example, a):
        return self.emit("Neg", [a], example)

    def op_pow(self, example, a, exponent):
        if not isinstance(a, _Value) or isinstance(exponent, _Value) and not exponent.const:
            self.fail("pow needs a tensor base and a constant exponent")
        return self.emit("Pow", [a, self.as_value(exponent, a)], example)

    def op_matmul(self, example, a, b):
        a, b = self.as_value(a), self.as_value(b)
        if a.rank < 2 or b.rank < 2:
            self.fail("matmul of a vector (rank 1): reshape it to a matrix first")
        return self.emit("MatMul", [a, b], example)

    op_bmm = op_matmul

    op_exp = _unary_op("Exp")
    op_sqrt = _unary_op("Sqrt")
    op_erf = _unary_op("Erf")
    op_tanh = _unary_op("Tanh")
    op_sigmoid = _unary_op("Sigmoid")
    op_relu = _unary_op("Relu")

    def op_rsqrt(self, example, x):
        root = self.emit("Sqrt", [x], example, suffix="sqrt")
        return self.emit("Div", [self.const(1.0, x), root], example)

    def op_gelu(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "approximate"), {"approximate": "none"}, "gelu")
        return self.gelu(example, a["input"], a["approximate"])

    def op_leaky_relu(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "negative_slope", "inplace"),
                  {"negative_slope": 0.01, "inplace": False}, "leaky_relu")
        return self.emit("LeakyRelu", [a["input"]], example, alpha=float(a["negative_slope"]))

    def op_softmax(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "dim", "_stacklevel", "dtype"),
                  {"dim": None, "_stacklevel": 3, "dtype": None}, "softmax")
        if a["dim"] is None or a["dtype"] is not None:
            self.fail("softmax needs dim= and no dtype=")
        return self.emit("Softmax", [a["input"]], example, axis=int(a["dim"]))

    def op_layer_norm(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                  {"weight": None, "bias": None, "eps": 1e-5}, "layer_norm")
        shape = tuple(_shape_args(a["normalized_shape"]))
        return self.layer_norm(example, a["input"], shape, a["weight"], a["bias"], a["eps"])

    def op_linear(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None}, "linear")
        return self.linear(example, a["input"], self.as_value(a["weight"]),
                           None if a["bias"] is None else self.as_value(a["bias"]))

    def op_embedding(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type",
                                 "scale_grad_by_freq", "sparse"),
                  {"padding_idx": None, "max_norm": None, "norm_type": 2.0,
                   "scale_grad_by_freq": False, "sparse": False}, "embedding")
        if a["padding_idx"] is not None or a["max_norm"] is not None or a["scale_grad_by_freq"]:
            self.fail("embedding with padding_idx, max_norm or scale_grad_by_freq")
        return self.emit("Gather", [self.as_value(a["weight"]), self.as_value(a["input"])],
                         example, axis=0)

    def op_dropout(self, example, *args, **kwargs):
        a = _bind(args, kwargs, ("input", "p", "training", "inplace"),
                  {"p": 0.5, "training": True, "inplace": False}, "dropout")
        return self.dropout(example, a["input"], a["p"], a["training"])

    def op_contiguous(self, example, x, *args, **kwargs):
        return _Value(x.name, example)  # same data; the example gets torch's new strides

    op_clone = op_contiguous

    def op_to(self, example, x, *args, **kwargs):
        if example.dtype != x.example.dtype:
            self.fail(f"conversion to {example.dtype}: the graph computes in one floating dtype")
        return _Value(x.name, example)

    def op_float(self, example, x):
        return self.op_to(example, x)

    op_type_as = op_to

    def op_transpose(self, example, x, dim0, dim1):
        perm = list(range(x.rank))
        i, j = _norm_axis(dim0, x.rank), _norm_axis(dim1, x.rank)
        perm[i], perm[j] = perm[j], perm[i]
        return self.emit("Transpose", [x], example, perm=perm)

    def op_t(self, example, x):
        if x.rank != 2:
            self.fail("t() of a tensor that is not a matrix")
        return self.emit("Transpose", [x], example, perm=[1, 0])

    def op_permute(self, example, x, *dims):
        perm = [_norm_axis(d, x.rank) for d in _shape_args(dims)]
        return self.emit("Transpose", [x], example, perm=perm)

    def reshape(self, example, x, shape):
        if list(shape) == list(x.shape):
            return x
        value = self.emit("Reshape", [x, self.const(np.array(shape, dtype=np.int64))], example)
        self.reshapes.append((len(self.b.graph.nodes) - 1, list(shape), list(x.shape)))
        return value

    def op_view(self, example, x, *shape):
        if len(shape) == 1 and not isinstance(shape[0], (tuple, list, int)) and \
                not hasattr(shape[0], "__iter__"):
            self.fail("view(dtype) is not supported")
        return self.reshape(example, x, _shape_args(shape))

    op_reshape = op_view

    def op_flatten(self, example, x, start_dim=0, end_dim=-1):
        return self.reshape(example, x, list(example.shape))

    def op_unsqueeze(self, example, x, dim):
        axis = _norm_axis(dim, x.rank + 1)
        return self.emit("Unsqueeze", [x, self.const(np.array([axis], dtype=np.int64))], example)

    def op_squeeze(self, example, x, dim=None):
        if dim is None:
            axes = [i for i, s in enumerate(x.shape) if s == 1]
        else:
            axes = [_norm_axis(dim, x.rank)] if x.shape[_norm_axis(dim, x.rank)] == 1 else []
        if not axes:
            return x
        return self.emit("Squeeze", [x, self.const(np.array(axes, dtype=np.int64))], example)

    def split_sizes(self, example, x, dim):
        axis = _norm_axis(dim, x.rank)
        sizes = [int(p.shape[axis]) for p in example]
        outs = self.emit("Split", [x, self.const(np.array(sizes, dtype=np.int64))], list(example),
                         outputs=len(sizes), axis=axis)
        return tuple(outs) if len(sizes) > 1 else (outs,)

    def op_split(self, example, x, split_size_or_sections, dim=0):
        return self.split_sizes(example, x, dim)

    def op_chunk(self, example, x, chunks, dim=0):
        return self.split_sizes(example, x, dim)

    def op_cat(self, example, tensors, dim=0):
        like = next(t for t in tensors if isinstance(t, _Value))
        values = [self.as_value(t, like) for t in tensors]
        return self.emit("Concat", values, example, axis=_norm_axis(dim, like.rank))

    def op_masked_fill(self, example, x, mask, value):
        mask = self.as_value(mask)
        if not mask.const:
            self.fail("masked_fill with a mask computed on the server: the mask must be "
                      "computable from constants (a buffer, torch.tril(torch.ones(...)), ...)")
        if isinstance(value, _Value) and not value.const:
            self.fail("masked_fill with a tensor fill value")
        fill = self.as_value(value, x)
        if fill.example.numel() != 1:
            self.fail("masked_fill with a fill that is not a scalar")
        # Where(keep, x, fill): the form the server fuses with the Softmax after it.
        keep = _Value(None, ~mask.example.to(self.torch.bool), const=True)
        return self.emit("Where", [keep, x, self.const(float(fill.example.reshape(())), x)],
                         example)

    def op_where(self, example, condition, a, b):
        condition = self.as_value(condition)
        if not condition.const:
            self.fail("where with a condition computed on the server (it must be computable "
                      "from constants)")
        like = a if isinstance(a, _Value) else b
        keep = _Value(None, condition.example.to(self.torch.bool), const=True)
        return self.emit("Where", [keep, self.as_value(a, like), self.as_value(b, like)],
                         example)

    def reduce_axes(self, x, dim):
        if dim is None:
            return list(range(x.rank))
        dims = [dim] if isinstance(dim, int) else list(dim)
        return [_norm_axis(d, x.rank) for d in dims]

    def op_mean(self, example, x, dim=None, keepdim=False, dtype=None):
        if dtype is not None:
            self.fail("mean with dtype=")
        return self.emit("ReduceMean", [x], example, axes=self.reduce_axes(x, dim),
                         keepdims=int(bool(keepdim)))

    def op_sum(self, example, x, dim=None, keepdim=False, dtype=None):
        if dtype is not None:
            self.fail("sum with dtype=")
        axes = self.const(np.array(self.reduce_axes(x, dim), dtype=np.int64))
        return self.emit("ReduceSum", [x, axes], example, keepdims=int(bool(keepdim)))

    def compare(self, example, *args, **kwargs):
        self.fail("a comparison of a value computed on the server: bool values (masks for "
                  "masked_fill / where) must be computable from constants and sizes alone")

    op_gt = op_lt = op_ge = op_le = op_eq = op_ne = compare

    def op_size(self, example, x, dim=None):
        return example

    def op_dim(self, example, x):
        return example

    def op_getattr(self, example, x, attribute):
        if attribute in ("shape", "device", "dtype", "ndim", "is_cuda"):
            return example
        if attribute == "T" and x.rank == 2:
            return self.emit("Transpose", [x], example, perm=[1, 0])
        self.fail(f"tensor attribute {attribute!r}")

    def op_getitem(self, example: Any, x: Any, index: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return x[index]
        if not isinstance(x, _Value):
            self.fail(f"indexing {type(x).__name__}")
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, _Value) for i in index):
            self.fail("indexing with a tensor (advanced indexing); use embedding/Gather")
        if index.count(Ellipsis) > 1:
            self.fail("indexing with two Ellipses")
        explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: List[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (x.rank - explicit))
            else:
                expanded.append(i)
        starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
        axis, out_axis = 0, 0
        for i in expanded:
            if i is None:
                unsqueeze.append(out_axis)
                out_axis += 1
                continue
            size = x.shape[axis]
            if isinstance(i, slice):
                start, stop, step = i.indices(size)
                if step < 1:
                    self.fail("slices with a step < 1")
                if (start, stop, step) != (0, size, 1):
                    starts.append(start)
                    ends.append(max(stop, start))
                    axes.append(axis)
                    steps.append(step)
                out_axis += 1
            elif isinstance(i, int):
                j = i + size if i < 0 else i
                starts.append(j)
                ends.append(j + 1)
                axes.append(axis)
                steps.append(1)
                squeeze.append(axis)
            else:
                self.fail(f"index {i!r}")
            axis += 1
        value = x
        if axes:
            shape = list(x.shape)  # the example of the Slice's output, if not the last step
            for s, e, a, st in zip(starts, ends, axes, steps):
                shape[a] = len(range(s, e, st))
            sliced = self.torch.empty(shape, dtype=x.example.dtype)
            value = self.emit("Slice", [x, self.const(np.array(starts, dtype=np.int64)),
                                        self.const(np.array(ends, dtype=np.int64)),
                                        self.const(np.array(axes, dtype=np.int64)),
                                        self.const(np.array(steps, dtype=np.int64))],
                              sliced if squeeze or unsqueeze else example,
                              suffix="slice" if squeeze or unsqueeze else "")
        if squeeze:
            shape = [s for k, s in enumerate(value.shape) if k not in squeeze]
            value = self.emit("Squeeze", [value, self.const(np.array(squeeze, dtype=np.int64))],
                              self.torch.empty(shape, dtype=x.example.dtype) if unsqueeze
                              else example, suffix="squeeze" if unsqueeze else "")
        if unsqueeze:
            value = self.emit("Unsqueeze",
                              [value, self.const(np.array(unsqueeze, dtype=np.int64))], example)
        return value


def _function_keys() -> Dict[Any, str]:
    import torch
    import torch.nn.functional as F
    keys = {
        operator.add: "add", operator.iadd: "add", torch.add: "add",
        operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
        operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
        operator.truediv: "truediv", operator.itruediv: "truediv", torch.div: "div",
        torch.true_divide: "truediv",
        operator.neg: "neg", torch.neg: "neg",
        operator.pow: "pow", torch.pow: "pow",
        operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm",
        operator.getitem: "getitem", getattr: "getattr",
        torch.exp: "exp", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.erf: "erf",
        torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.relu: "relu", F.relu: "relu",
        F.gelu: "gelu", F.leaky_relu: "leaky_relu", F.softmax: "softmax",
        torch.softmax: "softmax", F.layer_norm: "layer_norm", F.linear: "linear",
        F.embedding: "embedding", F.dropout: "dropout", torch.transpose: "transpose",
        torch.permute: "permute", torch.reshape: "reshape", torch.flatten: "flatten",
        torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.split: "split",
        torch.chunk: "chunk", torch.cat: "cat", torch.concat: "cat", torch.where: "where",
        torch.masked_fill: "masked_fill", torch.mean: "mean", torch.sum: "sum",
        torch.t: "t", F.tanh: "tanh", F.sigmoid: "sigmoid",
        operator.gt: "gt", operator.lt: "lt", operator.ge: "ge", operator.le: "le",
        operator.eq: "eq", operator.ne: "ne", torch.gt: "gt", torch.lt: "lt", torch.ge: "ge",
        torch.le: "le", torch.eq: "eq", torch.ne: "ne",
    }
    return keys


_FUNCTION_KEYS: Dict[Any, str] = {}

def _fx_tracer_class():
    import dis
    import inspect

    import torch
    import torch.fx

    class Tracer(torch.fx.Tracer):
        """torch.fx's Tracer, with ``a, b = x.size()`` working on Python 3.11.

        Proxy.__iter__ (torch 1.13) finds the UNPACK_SEQUENCE that unpacks a proxy as
        instruction number f_lasti // 2, which Python 3.11's inline CACHE entries make wrong,
        so it falls back to ``iter``, which refuses. Here the instruction is found by offset.
        """

        def iter(self, obj):
            frame = inspect.currentframe()
            caller = frame.f_back.f_back if frame is not None and frame.f_back else None
            if caller is not None:
                for inst in dis.get_instructions(caller.f_code):
                    if inst.offset == caller.f_lasti and inst.opname == "UNPACK_SEQUENCE":
                        return (obj[i] for i in range(inst.argval))
            return super().iter(obj)

        def trace(self, root, concrete_args=None):
            # Factory functions called with a size read from a proxy (torch.arange(0, t) for
            # the positions) are recorded as nodes instead of failing; their results, computed
            # from sizes only, become constants (Note [Tracing]).
            saved = {name: getattr(torch, name) for name in _FACTORIES}
            try:
                for name, function in saved.items():
                    setattr(torch, name, _recording(function))
                return super().trace(root, concrete_args)
            finally:
                for name, function in saved.items():
                    setattr(torch, name, function)

    return Tracer


_FACTORIES = ("arange", "ones", "zeros", "full", "empty")


def _recording(function):
    import functools

    import torch.fx

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        proxies = []
        _walk((args, kwargs), lambda o: proxies.append(o) if isinstance(o, torch.fx.Proxy)
              else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", function, args, kwargs)
        return function(*args, **kwargs)

    return wrapper


# Losses: the Loss message for a name, and the target input's dtype.
_CLASS_LOSSES = ("cross_entropy", "CrossEntropyLoss")


def from_module(module: Any, example_inputs: Any, loss: str = "cross_entropy", *,
                reduction: Optional[str] = "mean", ignore_index: Optional[int] = None,
                huber_delta: Optional[float] = None, target_name: str = "targets",
                target_dtype: Any = np.int64, dtype: Any = None,
                dropout_seed: Optional[int] = None, output_index: Optional[int] = None,
                record_stack_traces: bool = True) -> GraphModel:
    """Traces ``module`` with torch.fx on ``example_inputs`` and returns a ``GraphModel`` whose
    gradients are those of ``loss(module(*example_inputs), targets).backward()``.

    ``example_inputs``: one tensor, a tuple in forward-argument order, or a mapping by argument
    name; the graph is built for their shapes, the batch size excepted where possible (Note
    [Batch size]). ``loss``: a Loss kind or PyTorch
    loss class name (``gradserve.client.loss``); cross-entropy reads logits with the classes on
    the last axis and integer targets of the logits' shape without it (``target_dtype``,
    int64 by default), ``ignore_index`` as PyTorch's. ``dtype``: the floating dtype of float
    graph inputs (default: the module's parameters'). ``output_index`` picks one output of a
    module returning a tuple. Raises ``UnsupportedError`` for anything with no equivalent.
    """
    import inspect

    import torch
    import torch.fx

    if not _FUNCTION_KEYS:
        _FUNCTION_KEYS.update(_function_keys())
    params = list(module.parameters())
    if dtype is None:
        dtype = params[0].detach().numpy().dtype if params else np.float32
    float_dtype = {np.dtype(np.float32): torch.float32,
                   np.dtype(np.float64): torch.float64}.get(np.dtype(dtype))
    if float_dtype is None:
        raise ValueError(f"dtype must be float32 or float64, not {np.dtype(dtype)}")

    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(example_inputs, Mapping):
        examples = dict(example_inputs)
    else:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        if len(example_inputs) > len(names):
            raise ValueError(f"{len(example_inputs)} example inputs for forward{tuple(names)}")
        examples = dict(zip(names, example_inputs))
    examples = {k: torch.as_tensor(gc._as_numpy(v)) for k, v in examples.items()}
    if target_name in examples:
        raise ValueError(f"target_name {target_name!r} is also a forward argument; pick another")

    concrete = {n: None for n in names if n not in examples}
    trace = lambda inputs: _trace(module, inputs, concrete, float_dtype, dropout_seed,  # noqa
                                  output_index, record_stack_traces)
    builder, t, result, placeholders = trace(examples)
    batch_flexible = False
    if batch_flexible_hint(examples):
        # Note [Batch size]: traced again with one more row, the constants that change are
        # the batch-dependent sizes. Those of Reshape become 0 (copy the input's axis) or -1.
        wider = {k: torch.cat([v, v[:1]]) for k, v in examples.items()}
        try:
            other = trace(wider)
        except Exception:  # noqa: BLE001 - a model that only works at one batch size
            other = None
        if other is not None:
            batch_flexible = _generalise_batch(builder, t, other[0], other[1])

    kind = gc._LOSS_KINDS.get(loss)
    if kind is None:
        raise ValueError(f"unknown loss {loss!r}")
    loss_message = gc.loss(loss, reduction, huber_delta)
    if ignore_index is not None:
        if kind != "cross_entropy":
            raise ValueError("ignore_index only applies to cross-entropy")
        loss_message.cross_entropy.ignore_index = int(ignore_index)
    builder.input(target_name, target_dtype if kind == "cross_entropy" else dtype)
    output = result.name
    if output in [i.name for i in builder.graph.inputs] or \
            output in [p.name for p in builder.graph.parameters]:
        # The loss must read a node's output.
        output = builder.node("Identity", [output], outputs=[builder.fresh("output")],
                              name="output")
    model = builder.model(loss_message, output, target_name)

    # state_dict(keep_vars=True) lists tied parameters under every key (named_parameters
    # only under the first); frozen parameters and buffers were traced as constants.
    first = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    aliases, unused = {}, []
    for key, p in module.state_dict(keep_vars=True).items():
        name = first.get(id(p))
        if name is None:
            continue
        if name in t.used_params:
            aliases[key] = name
        elif key == name:
            unused.append(key)
    graph_model = GraphModel(model, dtype, [p.name for p in model.graph.parameters], aliases,
                             unused, placeholders, target_name, output, t.used_params)
    graph_model.batch_flexible = batch_flexible
    return graph_model


def batch_flexible_hint(examples: Mapping[str, Any]) -> bool:
    """Can the inputs grow by a row? (All of rank >= 1 with one leading size.)"""
    sizes = {tuple(v.shape[:1]) for v in examples.values()}
    return len(sizes) == 1 and all(v.dim() >= 1 for v in examples.values())


def _trace(module, examples, concrete, float_dtype, dropout_seed, output_index,
           record_stack_traces):
    """One trace: (GraphBuilder, _Tracer, result _Value, forward argument names)."""
    tracer = _fx_tracer_class()()
    tracer.record_stack_traces = record_stack_traces
    # Buffers as get_attr nodes, so that self.bias[:, :, :T, :T] with T a traced size works.
    tracer.proxy_buffer_attributes = True
    # Arguments without an example (optional ones, e.g. targets=None) are traced as constants.
    fx_graph = tracer.trace(module, concrete_args=concrete or None)
    builder = GraphBuilder()
    t = _Tracer(module, examples, float_dtype, dropout_seed, builder)
    placeholders = [n.target for n in fx_graph.nodes if n.op == "placeholder"
                    and n.target in examples]
    result = t.run(fx_graph)
    if output_index is not None:
        result = result[output_index]
    if not isinstance(result, _Value):
        raise UnsupportedError(f"the module returns {type(result).__name__}; expected one tensor "
                               "(output_index= picks one of a tuple)")
    if result.const:
        raise UnsupportedError("the module's output does not depend on its inputs or parameters")
    if not result.example.is_floating_point():
        raise UnsupportedError("the module's output is not floating")
    return builder, t, result, placeholders


# Note [Batch size]
# A graph's input shapes may change from call to call (the server plans each shape), but a
# traced graph bakes in every size the forward read with x.size(): Reshape targets such as
# view(B, T, n_head, head_dim). from_module therefore traces twice, the second time with every
# input one row longer, and compares the two graphs: if they differ only in Reshape targets,
# each changed entry becomes 0 when it equals the Reshape input's size on the same axis in both
# traces (ONNX: copy that axis), or -1 when it is the only other changed entry of its target;
# then the graph serves any batch size (micro-batches, a short last batch, other evaluation
# batches). Any other difference (a Slice bound, a constant computed from the batch size, a
# different structure) leaves the graph as traced, for the example's batch size only, and
# GraphModel.batch_flexible says which.

def _constant_inputs(builder: GraphBuilder) -> Dict[str, np.ndarray]:
    return {c.name: gc.from_graph_tensor(c.tensor) for c in builder.graph.constants}


def _generalise_batch(b1: GraphBuilder, t1: "_Tracer", b2: GraphBuilder, t2: "_Tracer") -> bool:
    n1, n2 = b1.graph.nodes, b2.graph.nodes
    if len(n1) != len(n2) or [r[0] for r in t1.reshapes] != [r[0] for r in t2.reshapes]:
        return False
    c1, c2 = _constant_inputs(b1), _constant_inputs(b2)
    reshape_nodes = {r[0] for r in t1.reshapes}
    for k, (a, b) in enumerate(zip(n1, n2)):
        if a.op_type != b.op_type or len(a.inputs) != len(b.inputs) or \
                a.attributes != b.attributes:
            return False
        for j, (x, y) in enumerate(zip(a.inputs, b.inputs)):
            if (x in c1) != (y in c2):
                return False
            if x in c1 and not (k in reshape_nodes and j == 1) and \
                    not np.array_equal(c1[x], c2[y]):
                return False
    new_targets = {}
    for (k, target1, shape1), (_, target2, shape2) in zip(t1.reshapes, t2.reshapes):
        target = list(target1)
        changed = [i for i in range(len(target)) if target1[i] != target2[i]]
        rest = []
        for i in changed:
            if i < len(shape1) and target1[i] == shape1[i] and target2[i] == shape2[i]:
                target[i] = 0
            else:
                rest.append(i)
        if len(rest) > 1 or (rest and -1 in target1):
            return False
        for i in rest:
            target[i] = -1
        new_targets[k] = target
    for k, target in new_targets.items():
        n1[k].inputs[1] = b1.constant(np.array(target, dtype=np.int64), "shape")
    used = {i for n in n1 for i in n.inputs}
    kept = [c for c in b1.graph.constants if c.name in used]
    del b1.graph.constants[:]
    b1.graph.constants.extend(kept)
    return True

