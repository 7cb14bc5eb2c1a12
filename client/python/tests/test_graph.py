"""Unit tests of the graph-model client helpers that need neither torch nor a server.

    client/python/generate.sh
    PYTHONPATH=client/python /usr/bin/python3 -m unittest discover -s client/python/tests -v

Covers GraphBuilder's messages (attribute kinds, constants sent once, scalar and bool tensors),
named tensors both ways, GraphModel's state_dict mapping (tied parameters under every key),
the numpy reference forward of a hand-written residual LayerNorm MLP, and TrainingStream's
graph steps (named fields, chunking by name) against a fake channel. The tracing from torch
modules, and the gradients themselves, are checked by bench/pytorch_crosscheck.py.
"""

import math
import sys
import unittest

import numpy as np

from gradserve import client as gc
from gradserve import graph as gg
import graph_numpy
from gradserve.client import pb


def residual_mlp(d=4, hidden=8, out=3, blocks=2):
    """The engine test's ResidualMlpSpec, by hand: blocks of x + fc2(gelu(fc1(ln(x))))."""
    b = gg.GraphBuilder()
    x = b.input("x", np.float64)
    t = b.input("targets", np.float64)
    for i in range(blocks):
        p = f"blocks.{i}"
        b.parameter(f"{p}.ln.weight", (d,))
        b.parameter(f"{p}.ln.bias", (d,))
        h = b.node("LayerNormalization", [x, f"{p}.ln.weight", f"{p}.ln.bias"], name=f"{p}.ln",
                   axis=-1, epsilon=1e-5)
        b.parameter(f"{p}.fc1.weight", (hidden, d))
        b.parameter(f"{p}.fc1.bias", (hidden,))
        h = b.node("Gemm", [h, f"{p}.fc1.weight", f"{p}.fc1.bias"], name=f"{p}.fc1", transB=1)
        h = b.node("Gelu", [h], name=f"{p}.act", approximate="tanh")
        b.parameter(f"{p}.fc2.weight", (d, hidden))
        b.parameter(f"{p}.fc2.bias", (d,))
        h = b.node("Gemm", [h, f"{p}.fc2.weight", f"{p}.fc2.bias"], name=f"{p}.fc2", transB=1)
        x = b.node("Add", [x, h], name=f"{p}.residual")
    b.parameter("head.weight", (out, d))
    y = b.node("Transpose", ["head.weight"], name="head.t", perm=[1, 0])
    y = b.node("MatMul", [x, y], name="head")
    scale = b.constant(0.5)
    y = b.node("Mul", [y, scale], name="scaled")
    return b, b.model(gc.loss("mse"), y, t)


def reference_mlp(params, x, d=4, blocks=2):
    def ln(v, w, bias):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * w + bias

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    for i in range(blocks):
        p = f"blocks.{i}"
        h = ln(x, params[f"{p}.ln.weight"], params[f"{p}.ln.bias"])
        h = gelu(h @ params[f"{p}.fc1.weight"].T + params[f"{p}.fc1.bias"])
        x = x + h @ params[f"{p}.fc2.weight"].T + params[f"{p}.fc2.bias"]
    return 0.5 * (x @ params["head.weight"].T)


def random_params(model, rng):
    return {p.name: rng.standard_normal(tuple(p.shape)) for p in model.graph.parameters}


class BuilderTest(unittest.TestCase):
    def test_messages(self):
        b, model = residual_mlp()
        g = model.graph
        self.assertEqual([(i.name, i.dtype) for i in g.inputs],
                         [("x", pb.DTYPE_FLOAT64), ("targets", pb.DTYPE_FLOAT64)])
        self.assertEqual(g.loss_output, "scaled")
        self.assertEqual(g.loss_target, "targets")
        self.assertEqual(list(g.outputs), ["scaled"])
        self.assertTrue(model.loss.HasField("mse"))
        self.assertEqual(len(g.parameters), 2 * 6 + 1)
        self.assertEqual(list(g.parameters[2].shape), [8, 4])
        kinds = {(n.op_type, a.name): a.WhichOneof("value") for n in g.nodes for a in n.attributes}
        self.assertEqual(kinds, {("LayerNormalization", "axis"): "i",
                                 ("LayerNormalization", "epsilon"): "f",
                                 ("Gemm", "transB"): "i", ("Gelu", "approximate"): "s",
                                 ("Transpose", "perm"): "ints"})
        # Node outputs are named after the node; every value once.
        self.assertEqual(list(g.nodes[0].outputs), ["blocks.0.ln"])
        names = [v for n in g.nodes for v in n.outputs]
        self.assertEqual(len(names), len(set(names)))
        # The scalar constant: rank 0, float64 data (the server converts it to the call's
        # dtype).
        (const,) = g.constants
        self.assertEqual((list(const.tensor.shape), const.tensor.dtype), ([], pb.DTYPE_FLOAT64))
        self.assertEqual(gc.from_graph_tensor(const.tensor), 0.5)

    def test_constants_sent_once_and_names_fresh(self):
        b = gg.GraphBuilder()
        first = b.constant(np.array([1, 2], dtype=np.int32), "shape")
        self.assertEqual(b.constant(np.array([1, 2], dtype=np.int64)), first)
        other = b.constant(np.array([1, 3]), "shape")
        self.assertEqual(other, "shape#2")
        mask = b.constant(np.tril(np.ones((3, 3), dtype=bool)), "mask")
        self.assertEqual(len(b.graph.constants), 3)
        tensor = b.graph.constants[2].tensor
        self.assertEqual((tensor.dtype, tensor.data), (pb.DTYPE_BOOL, bytes([1, 0, 0, 1, 1, 0,
                                                                             1, 1, 1])))
        self.assertEqual(mask, "mask")
        outs = b.node("Split", ["x"], outputs=3, name="qkv", axis=2)
        self.assertEqual(outs, ["qkv/0", "qkv/1", "qkv/2"])
        with self.assertRaisesRegex(ValueError, "defined twice"):
            b.parameter("mask", (3, 3))

    def test_attribute_types(self):
        with self.assertRaises(TypeError):
            gg.GraphBuilder().node("Foo", [], bad=object())
        node = gg.GraphBuilder().graph.nodes.add()
        node.attributes.append(gg._attribute("scales", [1, 2.5]))
        self.assertEqual(list(node.attributes[0].floats.values), [1.0, 2.5])


class TensorTest(unittest.TestCase):
    def test_graph_tensors_round_trip(self):
        for array in (np.float64(3.25), np.array(7, dtype=np.int64), np.array([[True, False]]),
                      np.arange(6, dtype=np.int32).reshape(2, 3),
                      np.ones((2, 2), dtype=np.float32)):
            tensor = gc.graph_tensor(array)
            back = gc.from_graph_tensor(tensor)
            self.assertEqual(back.shape, np.shape(array))
            self.assertEqual(back.dtype, np.asarray(array).dtype)
            np.testing.assert_array_equal(back, array)

    def test_named_tensors_convert_floats_only(self):
        named = gc.named_tensors({"ids": np.array([[1, 2]]), "x": np.ones(3)}, np.float32)
        self.assertEqual([(t.name, t.tensor.dtype) for t in named],
                         [("ids", pb.DTYPE_INT64), ("x", pb.DTYPE_FLOAT32)])
        self.assertEqual(sorted(gc.named_arrays(named)), ["ids", "x"])


class NumpyForwardTest(unittest.TestCase):
    def test_hand_written_mlp_matches_numpy(self):
        _, model = residual_mlp()
        rng = np.random.default_rng(0)
        params = random_params(model, rng)
        x = rng.standard_normal((5, 4))
        t = rng.standard_normal((5, 3))
        values = graph_numpy.run(model.graph, {"x": x, "targets": t, **params})
        want = reference_mlp(params, x)
        np.testing.assert_allclose(values["scaled"], want, rtol=1e-13, atol=1e-13)
        self.assertAlmostEqual(graph_numpy.loss_value(model, values),
                               float(((want - t) ** 2).mean()), places=12)


def tied_model():
    """A GraphModel as from_module makes it for an LM head tied to the embedding."""
    b = gg.GraphBuilder()
    b.input("idx", np.int64)
    b.parameter("wte.weight", (5, 2))
    e = b.node("Gather", ["wte.weight", "idx"], name="wte", axis=0)
    wt = b.node("Transpose", ["wte.weight"], name="lm_head.t", perm=[1, 0])
    y = b.node("MatMul", [e, wt], name="lm_head")
    b.input("targets", np.int64)
    model = b.model(gc.loss("cross_entropy"), y, "targets")
    return gg.GraphModel(model, np.float32, ["wte.weight"],
                         {"wte.weight": "wte.weight", "lm_head.weight": "wte.weight"}, [],
                         ["idx"], "targets", y, {"wte.weight": (5, 2)})


class _Traced:
    """What _generalise_batch reads of a tracer: the Reshape nodes it wrote."""

    def __init__(self, reshapes):
        self.reshapes = reshapes


def traced_pair(batch, scale=2.0):
    """x [B, 6, 4] -> Reshape [B, 6, 2, 2] -> Reshape [B * 6, 4] -> Mul(scale), as a trace at
    batch size ``batch`` would write it."""
    b = gg.GraphBuilder()
    b.input("x", np.float32)
    s1 = b.constant(np.array([batch, 6, 2, 2]), "view/const")
    h = b.node("Reshape", ["x", s1], name="view")
    s2 = b.constant(np.array([batch * 6, 4]), "flat/const")
    h = b.node("Reshape", [h, s2], name="flat")
    b.node("Mul", [h, b.constant(scale)], name="scaled")
    return b, _Traced([(0, [batch, 6, 2, 2], [batch, 6, 4]),
                       (1, [batch * 6, 4], [batch, 6, 2, 2])])


class BatchSizeTest(unittest.TestCase):
    """Note [Batch size]: Reshape targets that follow the batch become 0 or -1."""

    def test_reshapes_generalised(self):
        b1, t1 = traced_pair(4)
        b2, t2 = traced_pair(5)
        self.assertTrue(gg._generalise_batch(b1, t1, b2, t2))
        consts = {c.name: gc.from_graph_tensor(c.tensor).tolist() for c in b1.graph.constants}
        targets = [consts[n.inputs[1]] for n in b1.graph.nodes if n.op_type == "Reshape"]
        self.assertEqual(targets, [[0, 6, 2, 2], [-1, 4]])
        # The batch-specific shapes are no longer sent.
        self.assertEqual(len(consts), 3)
        self.assertNotIn([4, 6, 2, 2], consts.values())
        self.assertNotIn([24, 4], consts.values())
        # The graph now runs at another batch size.
        values = graph_numpy.run(b1.graph, {"x": np.ones((3, 6, 4))})
        self.assertEqual(values["scaled"].shape, (18, 4))

    def test_other_batch_dependent_constant_keeps_the_graph_fixed(self):
        b1, t1 = traced_pair(4, scale=2.0)
        b2, t2 = traced_pair(5, scale=3.0)
        self.assertFalse(gg._generalise_batch(b1, t1, b2, t2))
        consts = [gc.from_graph_tensor(c.tensor).tolist() for c in b1.graph.constants]
        self.assertIn([4, 6, 2, 2], consts)


class GraphModelTest(unittest.TestCase):
    def test_state_dict_both_ways(self):
        model = tied_model()
        state = {"wte.weight": np.arange(10.0).reshape(5, 2), "lm_head.weight": None,
                 "pos": np.zeros(3)}
        request = model.request(state, np.array([[0, 4, 1]]), np.array([[1, 2, 3]]))
        self.assertEqual([(p.name, p.tensor.dtype) for p in request.named_parameters],
                         [("wte.weight", pb.DTYPE_FLOAT32)])
        self.assertEqual([(i.name, i.tensor.dtype, list(i.tensor.shape))
                          for i in request.graph_inputs],
                         [("idx", pb.DTYPE_INT64, [1, 3]), ("targets", pb.DTYPE_INT64, [1, 3])])
        # One gradient on the wire, under both state_dict keys in the mapping.
        response = pb.ComputeGradientsResponse()
        response.named_gradients.append(
            pb.NamedTensor(name="wte.weight", tensor=gc.to_tensor(np.ones((5, 2), np.float32))))
        grads = model.gradients(response)
        self.assertEqual(sorted(grads), ["lm_head.weight", "wte.weight"])
        self.assertIs(grads["lm_head.weight"], grads["wte.weight"])
        self.assertEqual(sorted(model.gradients(response, aliases=False)), ["wte.weight"])
        stream_answer = pb.StreamGradientsResponse(result=response)
        self.assertEqual(sorted(model.gradients(stream_answer)), ["lm_head.weight", "wte.weight"])

    def test_other_dtype_retypes_float_inputs(self):
        b = gg.GraphBuilder()
        b.input("x", np.float64)
        b.input("t", np.float64)
        b.parameter("w", (2, 2))
        y = b.node("MatMul", ["x", "w"])
        model = gg.GraphModel(b.model(gc.loss("mse"), y, "t"), np.float64, ["w"], {"w": "w"},
                              [], ["x"], "t", y, {"w": (2, 2)})
        request = model.request({"w": np.eye(2)}, np.ones((3, 2)), np.ones((3, 2)),
                                dtype=np.float32)
        self.assertEqual([i.dtype for i in request.model.graph.inputs],
                         [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT32])
        self.assertEqual({t.tensor.dtype for t in request.graph_inputs}, {pb.DTYPE_FLOAT32})
        self.assertEqual(model.graph.inputs[0].dtype, pb.DTYPE_FLOAT64)  # unchanged

    def test_parameter_errors(self):
        model = tied_model()
        with self.assertRaisesRegex(KeyError, "wte.weight"):
            model.parameter_arrays({"lm_head.weight": np.zeros((5, 2))})
        with self.assertRaisesRegex(ValueError, r"shape \[2, 5\]"):
            model.parameter_arrays({"wte.weight": np.zeros((2, 5))})
        with self.assertRaisesRegex(ValueError, "expected 1 inputs"):
            model.input_arrays((np.zeros(3), np.zeros(3)))


class _FakeChannel:
    """Answers StreamGradients in-process: one response per step without accumulate."""

    def __init__(self):
        self.messages = []

    def stream_stream(self, method, request_serializer=None, response_deserializer=None,
                      **kwargs):
        def call(requests, timeout=None, **kw):
            for request in requests:
                self.messages.append(request)
                if request.HasField("step") and not request.step.accumulate:
                    yield pb.StreamGradientsResponse(result=pb.ComputeGradientsResponse(
                        loss=float(len(self.messages))))
        return call

    def unary_unary(self, *args, **kwargs):
        return None

    unary_stream = stream_unary = unary_unary


class TrainingStreamTest(unittest.TestCase):
    def test_graph_steps_by_name_with_chunks(self):
        channel = _FakeChannel()
        model = tied_model()
        params = {"wte.weight": np.ones((5, 2))}
        inputs = {"idx": np.array([[0, 1]]), "targets": np.array([[1, 1]])}
        with gc.TrainingStream(channel, model.model, np.float32, chunk_bytes=16) as stream:
            first = stream.step(graph_inputs=inputs, parameters=params)
            stream.step(graph_inputs=inputs, update={"wte.weight": -0.1 * np.ones((5, 2))})
        self.assertGreater(first.result.loss, 0)
        kinds = [m.WhichOneof("kind") for m in channel.messages]
        fields = [m.chunk.field for m in channel.messages if m.HasField("chunk")]
        # 40 bytes of float32 parameters in 16-byte chunks; the 16-byte inputs travel inline.
        self.assertEqual(fields[:3], ["named_parameters[wte.weight]"] * 3)
        self.assertEqual(fields[3:], ["named_parameter_update[wte.weight]"] * 3)
        self.assertEqual(kinds.count("step"), 2)
        steps = [m.step for m in channel.messages if m.HasField("step")]
        self.assertEqual([i.name for i in steps[0].graph_inputs], ["idx", "targets"])
        self.assertEqual(steps[0].graph_inputs[0].tensor.dtype, pb.DTYPE_INT64)
        self.assertEqual(len(steps[0].named_parameters), 0)  # all sent as chunks
        first_chunk = channel.messages[1].chunk
        self.assertEqual((first_chunk.dtype, list(first_chunk.shape)), (pb.DTYPE_FLOAT32, [5, 2]))

    def test_graph_step_refuses_chain_fields(self):
        stream = gc.TrainingStream(_FakeChannel(), tied_model().model, np.float32)
        with self.assertRaisesRegex(ValueError, "graph_inputs only"):
            stream.step(np.zeros((1, 2)), graph_inputs={"idx": np.zeros((1, 2), np.int64)})
        with self.assertRaisesRegex(ValueError, "mapping"):
            stream.step(graph_inputs={"idx": np.zeros((1, 2), np.int64)},
                        parameters=[(np.zeros((2, 2)), None)])


class NoTorchTest(unittest.TestCase):
    def test_torch_not_imported(self):
        self.assertNotIn("torch", sys.modules)


if __name__ == "__main__":
    unittest.main()
