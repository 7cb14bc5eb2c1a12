"""Unit tests of gradserve.onnx's torch-free half (OnnxFile), on a committed test model.

    client/python/generate.sh
    PYTHONPATH=client/python /usr/bin/python3 -m unittest discover -s client/python/tests -v

The export (from_torch) and the gradients themselves are checked against autograd by
bench/pytorch_crosscheck.py --only onnx, and the files sent as-is by tests/e2e/python_onnx.py.
"""

import unittest
from pathlib import Path

import numpy as np

from gradserve import onnx as go
from gradserve.client import pb

MLP = Path(__file__).resolve().parents[3] / "tests" / "data" / "onnx" / "mlp.onnx"


class OnnxFileTest(unittest.TestCase):
    def test_request_carries_the_file_and_the_batch_by_name(self):
        model = go.OnnxFile(MLP, loss="mse", input_names=["x"], frozen=["net.0.bias"])
        x = np.ones((2, 5), np.float32)
        y = np.zeros((2, 3), np.float32)
        request = model.request(x, y)
        self.assertEqual(request.model.onnx.model, MLP.read_bytes())
        self.assertEqual(list(request.model.onnx.frozen), ["net.0.bias"])
        self.assertTrue(request.model.loss.HasField("mse"))
        self.assertEqual([n.name for n in request.graph_inputs], ["x", "target"])
        self.assertEqual(request.graph_inputs[0].tensor.dtype, pb.DTYPE_FLOAT32)
        self.assertEqual(list(request.graph_inputs[1].tensor.shape), [2, 3])
        self.assertEqual(len(request.named_parameters), 0)  # The file's values.

    def test_parameters_by_name_leave_out_frozen_ones(self):
        model = go.OnnxFile(MLP.read_bytes(), input_names=["x"], frozen=["net.0.bias"])
        request = model.request(np.ones((1, 5)), np.ones((1, 3)), dtype=np.float64,
                                parameters={"net.0.weight": np.zeros((7, 5)),
                                            "net.0.bias": np.zeros(7)})
        self.assertEqual([p.name for p in request.named_parameters], ["net.0.weight"])
        self.assertEqual(request.named_parameters[0].tensor.dtype, pb.DTYPE_FLOAT64)
        self.assertEqual(request.model.onnx.dtype, pb.DTYPE_FLOAT64)

    def test_several_inputs_need_their_names(self):
        model = go.OnnxFile(MLP)
        with self.assertRaises(ValueError):
            model.request((np.ones((1, 5)), np.ones((1, 5))), np.ones((1, 3)))

    def test_gradients_under_every_tied_key(self):
        model = go.OnnxFile(MLP, aliases={"wte.weight": ["lm_head.weight"]})
        g = np.arange(6, dtype=np.float32).reshape(2, 3)
        response = pb.ComputeGradientsResponse(named_gradients=[pb.NamedTensor(
            name="wte.weight", tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3],
                                                data=g.tobytes()))])
        grads = model.gradients(response)
        self.assertEqual(sorted(grads), ["lm_head.weight", "wte.weight"])
        np.testing.assert_array_equal(grads["lm_head.weight"], g)


if __name__ == "__main__":
    unittest.main()
