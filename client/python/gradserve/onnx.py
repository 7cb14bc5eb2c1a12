"""ONNX models for gradserve: export a torch module once, send the file, get gradients by name.

    stub = gc.stub(gc.connect("localhost:50051"))
    model = from_torch(net, (x,), loss="cross_entropy")     # torch.onnx.export, in memory
    loss, grads = model.compute(stub, x, y)                   # {state_dict key: np.ndarray}

``from_torch`` runs ``torch.onnx.export`` as a PyTorch user would for training (training mode,
no constant folding, opset 17, every input axis dynamic but the features of floating inputs),
and names the module's buffers as ``OnnxModel.frozen``: the server trains exactly the module's
parameters. ``OnnxFile`` wraps the bytes: ``model()`` is the ``pb.Model`` to send (unary or as a
stream's set-up), ``request()`` a whole ``ComputeGradientsRequest``, ``gradients()`` the answer
as ``{state_dict key: array}`` (a tied weight under every key that holds it), ``compute()``
both around one call. Without torch, ``OnnxFile(path_or_bytes, ...)`` sends any .onnx file.

Parameters: by default the server uses the file's values; pass ``parameters`` (a module, a
state_dict or a dict of arrays) to send current weights by name (an optimizer's loop), or use a
``TrainingStream`` with ``model()`` and ``named_parameter_update``.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gradserve import client as gc
from gradserve.client import pb

__all__ = ["OnnxFile", "export", "from_torch"]


def _input_names(module: Any, count: int) -> List[str]:
    """The forward's own argument names, so the request names its batch as the code does."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:count]
    except (TypeError, ValueError):
        names = []
    if len(names) < count or "target" in names:
        names = [f"input_{i}" for i in range(count)]
    return names


def export(module: Any, example_inputs: Sequence[Any], *, opset: int = 17,
           input_names: Optional[Sequence[str]] = None,
           output_names: Optional[Sequence[str]] = None) -> bytes:
    """``torch.onnx.export`` of ``module`` to bytes, for training: TrainingMode.TRAINING,
    do_constant_folding=False, every axis of every input dynamic except the last of floating
    inputs (their features)."""
    import torch

    inputs = tuple(example_inputs)
    names = list(input_names) if input_names is not None else _input_names(module, len(inputs))
    dynamic = {}
    for name, x in zip(names, inputs):
        axes = range(x.dim() - 1 if x.is_floating_point() else x.dim())
        dynamic[name] = {a: f"{name}_dim{a}" for a in axes}
    buffer = io.BytesIO()
    was_training = module.training
    try:
        torch.onnx.export(module, inputs, buffer, training=torch.onnx.TrainingMode.TRAINING,
                          do_constant_folding=False, opset_version=opset, input_names=names,
                          output_names=list(output_names) if output_names else None,
                          dynamic_axes=dynamic)
    finally:
        module.train(was_training)
    return buffer.getvalue()


class OnnxFile:
    """An .onnx file and what the server needs besides it (the loss, the batch's names).

    ``source``: the file's bytes or its path. ``loss``: a gc.loss name ("mse",
    "cross_entropy", ...) or a ``pb.Loss``. ``input_names``: the graph inputs the positional
    arguments of ``request``/``compute`` fill, in order (default: the file's inputs without an
    initializer). ``frozen``: initializers the server must hold constant. ``aliases``:
    {initializer name: [other state_dict keys holding the same tensor]}.
    """

    def __init__(self, source: Union[bytes, str, Path], loss: Union[str, "pb.Loss"] = "mse", *,
                 input_names: Optional[Sequence[str]] = None, frozen: Sequence[str] = (),
                 aliases: Optional[Mapping[str, Sequence[str]]] = None,
                 loss_output: str = "", loss_target: str = "target",
                 disable_dropout: bool = False, dtype: Any = None) -> None:
        self.data = bytes(source) if isinstance(source, (bytes, bytearray)) else \
            Path(source).read_bytes()
        self.loss = gc.loss(loss) if isinstance(loss, str) else loss
        self.input_names = list(input_names) if input_names is not None else None
        self.frozen = list(frozen)
        self.aliases = {k: list(v) for k, v in (aliases or {}).items()}
        self.loss_output = loss_output
        self.loss_target = loss_target
        self.disable_dropout = disable_dropout
        self.dtype = dtype

    def model(self, dtype: Any = None) -> "pb.Model":
        """The ``pb.Model`` carrying the file (for a request, or a stream's set-up)."""
        chosen = dtype if dtype is not None else self.dtype
        onnx = pb.OnnxModel(model=self.data, frozen=self.frozen, loss_output=self.loss_output,
                            loss_target=self.loss_target if self.loss_target != "target" else "",
                            disable_dropout=self.disable_dropout)
        if chosen is not None:
            onnx.dtype = gc._wire_dtype(chosen)
        return pb.Model(onnx=onnx, loss=self.loss)

    def _names(self, count: int) -> List[str]:
        if self.input_names is not None:
            if len(self.input_names) != count:
                raise ValueError(f"expected {len(self.input_names)} inputs "
                                 f"({', '.join(self.input_names)}), got {count}")
            return self.input_names
        if count != 1:
            raise ValueError("several inputs: give OnnxFile(input_names=...) their names")
        return ["input_0"]

    def graph_inputs(self, inputs: Union[Any, Sequence[Any], Mapping[str, Any]], target: Any,
                     dtype: Any = None) -> List["pb.NamedTensor"]:
        """The batch as ``graph_inputs``: positional inputs (one array, a tuple) or a dict by
        name, and the loss target (floating arrays sent in ``dtype``, default their own)."""
        if isinstance(inputs, Mapping):
            arrays = dict(inputs)
        else:
            seq = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
            arrays = dict(zip(self._names(len(seq)), seq))
        arrays[self.loss_target] = target
        return gc.named_tensors(arrays, dtype)

    def named_parameters(self, parameters: Any, dtype: Any = None) -> List["pb.NamedTensor"]:
        """``parameters`` (a torch module, a state_dict, or {name: array}) as named_parameters,
        by initializer name; keys the file does not train are left out."""
        if hasattr(parameters, "state_dict"):
            parameters = parameters.state_dict()
        arrays = {}
        for name, value in parameters.items():
            if name in self.frozen:
                continue
            arrays[name] = gc._as_numpy(value)
        return gc.named_tensors(arrays, dtype)

    def request(self, inputs: Any, target: Any, *, parameters: Any = None, dtype: Any = None,
                options: Optional["pb.ComputeOptions"] = None) -> "pb.ComputeGradientsRequest":
        """A ComputeGradientsRequest for one batch; without ``parameters`` the file's values."""
        request = pb.ComputeGradientsRequest(
            model=self.model(dtype), graph_inputs=self.graph_inputs(inputs, target, dtype))
        if parameters is not None:
            request.named_parameters.extend(self.named_parameters(parameters, dtype))
        if options is not None:
            request.options.CopyFrom(options)
        return request

    def gradients(self, response: "pb.ComputeGradientsResponse", *,
                  as_torch: bool = False) -> Dict[str, Any]:
        """{state_dict key: dL/d(parameter)}; a tied weight appears under each of its keys."""
        out = {}
        for named in response.named_gradients:
            array = gc.from_graph_tensor(named.tensor)
            if as_torch:
                import torch
                array = torch.from_numpy(array.copy())
            for key in [named.name] + self.aliases.get(named.name, []):
                out[key] = array
        return out

    def compute(self, stub: Any, inputs: Any, target: Any, *, parameters: Any = None,
                dtype: Any = None, options: Optional["pb.ComputeOptions"] = None,
                timeout: float = 60.0, as_torch: bool = False) -> Tuple[float, Dict[str, Any]]:
        """One ComputeGradients call: (loss, {state_dict key: gradient})."""
        response = stub.ComputeGradients(
            self.request(inputs, target, parameters=parameters, dtype=dtype, options=options),
            timeout=timeout)
        return response.loss, self.gradients(response, as_torch=as_torch)


def from_torch(module: Any, example_inputs: Union[Any, Sequence[Any]],
               loss: Union[str, "pb.Loss"] = "mse", *, opset: int = 17,
               input_names: Optional[Sequence[str]] = None,
               disable_dropout: bool = False) -> OnnxFile:
    """Exports ``module`` (see ``export``) and returns the ``OnnxFile`` to send: its buffers
    frozen, tied parameters reported under each of their keys, inputs named as ``forward``'s
    arguments."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else \
        (example_inputs,)
    names = list(input_names) if input_names is not None else _input_names(module, len(inputs))
    data = export(module, inputs, opset=opset, input_names=names)
    frozen = [name for name, _ in module.named_buffers()]
    # state_dict keys sharing one tensor: the export keeps one name (the first registered).
    by_tensor: Dict[int, List[str]] = {}
    import torch

    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter):
            by_tensor.setdefault(id(t), []).append(name)
    aliases = {name: [other for other in group if other != name]
               for group in by_tensor.values() if len(group) > 1 for name in group}
    dtype = None
    for p in module.parameters():
        dtype = np.float64 if str(p.dtype) == "torch.float64" else np.float32
        break
    return OnnxFile(data, loss, input_names=names, frozen=_initializers_among(data, frozen),
                    aliases=aliases, disable_dropout=disable_dropout, dtype=dtype)


def _initializers_among(data: bytes, names: Sequence[str]) -> List[str]:
    """The names that are initializers of the file (a buffer torch folded away is not, and
    OnnxModel.frozen must name initializers)."""
    if not names:
        return []
    import onnx  # Debian's python3-onnx (deploy/install-deps.sh --bench installs it).

    model = onnx.load_from_string(data)
    present = {t.name for t in model.graph.initializer}
    return [n for n in names if n in present]
