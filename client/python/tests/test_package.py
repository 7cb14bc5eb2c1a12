"""Unit tests of the gradserve package itself: what it ships, numpy <-> tensors, and the
state_dict <-> chain parameters mapping. No server, no torch.

    /usr/bin/python3 -m unittest discover -s client/python/tests -v   (package installed, or
    PYTHONPATH=client/python after client/python/generate.sh)
"""

import importlib.resources
import json
import re
import tomllib
import unittest
from pathlib import Path

import numpy as np

import gradserve
from gradserve import pb

REPO = Path(__file__).resolve().parents[3]


class PackageTest(unittest.TestCase):
    def test_version_matches_pyproject_and_cmake(self):
        with open(REPO / "client" / "python" / "pyproject.toml", "rb") as f:
            self.assertEqual(tomllib.load(f)["project"]["version"], gradserve.__version__)
        cmake = (REPO / "CMakeLists.txt").read_text()
        self.assertEqual(re.search(r"project\(gradserve VERSION (\S+)", cmake).group(1),
                         gradserve.__version__)

    def test_ships_type_marker_stubs_and_the_shared_service_config(self):
        files = importlib.resources.files("gradserve")
        self.assertTrue(files.joinpath("py.typed").is_file())
        self.assertTrue(files.joinpath("v1", "gradserve_pb2_grpc.py").is_file())
        self.assertTrue(files.joinpath("optimizer", "v1", "optimizer_pb2.py").is_file())
        shipped = json.loads(gradserve.service_config())
        source = json.loads((REPO / "client" / "service_config.json").read_text())
        self.assertEqual(shipped, source)

    def test_exports_what_the_readme_uses(self):
        for name in ("connect", "stub", "health", "to_tensor", "from_tensor", "loss",
                     "parameters_from_state_dict", "state_dict_gradients", "TrainingStream",
                     "ShardedClient", "GraphBuilder", "request_from_sequential"):
            self.assertTrue(callable(getattr(gradserve, name)), name)
        from gradserve.optimizer.v1 import optimizer_pb2_grpc
        self.assertTrue(hasattr(optimizer_pb2_grpc, "OptimizerServiceStub"))


class TensorTest(unittest.TestCase):
    def test_every_dtype_round_trips_bit_for_bit(self):
        for dtype, wire in ((np.float32, pb.DTYPE_FLOAT32), (np.float64, pb.DTYPE_FLOAT64),
                            (np.int32, pb.DTYPE_INT32), (np.int64, pb.DTYPE_INT64)):
            array = (np.arange(24).reshape(2, 3, 4) * 7 - 80).astype(dtype)
            if array.dtype.kind == "f":
                array[0, 0, 0] = np.nextafter(dtype(1), dtype(2))  # the last bit matters
            tensor = gradserve.to_tensor(array)
            self.assertEqual(tensor.dtype, wire)
            self.assertEqual(list(tensor.shape), [2, 3, 4])
            self.assertEqual(len(tensor.data), array.nbytes)
            back = gradserve.from_tensor(tensor)
            self.assertEqual(back.dtype, array.dtype)
            np.testing.assert_array_equal(back, array)

    def test_int64_beyond_two_to_the_53_is_exact(self):
        array = np.array([2**62 + 1, -(2**63), 2**63 - 1], dtype=np.int64)
        np.testing.assert_array_equal(gradserve.from_tensor(gradserve.to_tensor(array)), array)

    def test_big_endian_and_fortran_order_arrays_travel_as_little_endian_row_major(self):
        native = np.arange(6, dtype=np.float64).reshape(2, 3)
        for variant in (native.astype(">f8"), np.asfortranarray(native), native.T.copy().T):
            tensor = gradserve.to_tensor(variant)
            self.assertEqual(tensor.data, native.astype("<f8").tobytes())

    def test_wrong_byte_count_is_refused_with_the_shape(self):
        tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
        with self.assertRaisesRegex(ValueError, r"shape \[2, 3\].*needs 24 bytes, has 20"):
            gradserve.from_tensor(tensor)

    def test_unsupported_numpy_dtype_is_refused(self):
        with self.assertRaisesRegex(ValueError, "no dtype for numpy"):
            gradserve.to_tensor(np.zeros(3, dtype=np.float16))


def _mlp(bias_last=True):
    return pb.Model(layers=[
        pb.Layer(linear=pb.Linear(in_features=4, out_features=3)),
        pb.Layer(relu=pb.ReLU()),
        pb.Layer(name="head", linear=pb.Linear(in_features=3, out_features=2, bias=bias_last)),
    ], loss=gradserve.loss("mse"))


class StateDictTest(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(3)
        self.state = {"0.weight": rng.normal(size=(3, 4)), "0.bias": rng.normal(size=3),
                      "head.weight": rng.normal(size=(2, 3)), "head.bias": rng.normal(size=2),
                      "unused.buffer": np.zeros(1)}

    def test_prefixes_are_layer_names_else_indices(self):
        self.assertEqual(gradserve.linear_prefixes(_mlp()), ["0", "head"])

    def test_parameters_in_model_order_and_dtype(self):
        params = gradserve.parameters_from_state_dict(_mlp(), self.state, np.float32)
        self.assertEqual(len(params), 2)
        np.testing.assert_array_equal(gradserve.from_tensor(params[1].weight),
                                      self.state["head.weight"].astype(np.float32))
        np.testing.assert_array_equal(gradserve.from_tensor(params[0].bias),
                                      self.state["0.bias"].astype(np.float32))
        self.assertEqual(params[0].weight.dtype, pb.DTYPE_FLOAT32)

    def test_missing_key_wrong_shape_and_unexpected_bias_are_named(self):
        missing = dict(self.state)
        del missing["head.bias"]
        with self.assertRaisesRegex(KeyError, "head.bias"):
            gradserve.parameters_from_state_dict(_mlp(), missing)
        transposed = dict(self.state, **{"0.weight": self.state["0.weight"].T})
        with self.assertRaisesRegex(ValueError, r"0.weight has shape \[4, 3\].*\[3, 4\]"):
            gradserve.parameters_from_state_dict(_mlp(), transposed)
        with self.assertRaisesRegex(ValueError, "head.bias is given but layer head has bias"):
            gradserve.parameters_from_state_dict(_mlp(bias_last=False), self.state)

    def test_gradients_come_back_under_the_same_keys(self):
        response = pb.ComputeGradientsResponse()
        for shape_w, shape_b in (((3, 4), (3,)), ((2, 3), None)):
            grads = response.gradients.add()
            grads.weight.CopyFrom(gradserve.to_tensor(np.ones(shape_w)))
            if shape_b is not None:
                grads.bias.CopyFrom(gradserve.to_tensor(np.ones(shape_b)))
        named = gradserve.state_dict_gradients(_mlp(bias_last=False), response)
        self.assertEqual(sorted(named), ["0.bias", "0.weight", "head.weight"])
        self.assertEqual(named["head.weight"].shape, (2, 3))

    def test_graph_gradients_are_by_parameter_name(self):
        model = pb.Model(graph=pb.Graph(loss_output="y"))
        response = pb.ComputeGradientsResponse(named_gradients=gradserve.named_tensors(
            {"fc.weight": np.ones((2, 2))}))
        self.assertEqual(list(gradserve.state_dict_gradients(model, response)), ["fc.weight"])


if __name__ == "__main__":
    unittest.main()
