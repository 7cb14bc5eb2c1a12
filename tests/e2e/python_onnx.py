"""Sends each committed ONNX test model (tests/data/onnx, exported by export_models.py) as-is to
a real gradserve, from a client written from the .proto alone (generated stubs, grpcio, numpy),
and compares the answer with PyTorch autograd's, committed next to the file:

    python_onnx.py --target 127.0.0.1:PORT --stubs DIR --data tests/data/onnx

For every model: the float64 file must match PyTorch's float64 gradients and loss to 1e-9
relative, the float32 file PyTorch's float32 ones to 1e-4; a StreamGradients stream that sends
the file once must answer the same as the unary call, bit for bit; parameters sent by name must
replace the file's. Exits non-zero on any failure.
"""

import argparse
import json
import sys
from pathlib import Path

TIMEOUT = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--stubs", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    args = parser.parse_args()
    sys.path[:0] = [str(args.stubs.resolve())]
    import grpc
    import numpy as np

    from gradserve.v1 import gradserve_pb2 as pb
    from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(args.target, options=[
        ("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.GradientServiceStub(channel)
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    wire = {"float32": (pb.DTYPE_FLOAT32, np.float32), "float64": (pb.DTYPE_FLOAT64, np.float64),
            "int64": (pb.DTYPE_INT64, np.int64)}

    def to_tensor(array, dtype_name):
        dtype, np_dtype = wire[dtype_name]
        a = np.ascontiguousarray(np.asarray(array, dtype=np_dtype))
        return pb.Tensor(dtype=dtype, shape=list(a.shape), data=a.astype("<" + a.dtype.str[1:])
                         .tobytes())

    def from_tensor(t):
        np_dtype = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT64: "<f8", pb.DTYPE_INT64: "<i8"}[t.dtype]
        return np.frombuffer(t.data, dtype=np_dtype).reshape(tuple(t.shape))

    def json_array(t):
        return np.asarray(t["data"], dtype=np.int64 if t["dtype"] == "int64" else np.float64) \
            .reshape(t["shape"])

    def rel_error(got, want):
        scale = max(float(np.max(np.abs(want))), 1e-30)
        return float(np.max(np.abs(got.astype(np.float64) - want))) / scale

    for ref_path in sorted(args.data.glob("*.json")):
        ref = json.loads(ref_path.read_text())
        name = ref["model"]
        loss = (pb.Loss(mse=pb.MSELoss()) if ref["loss"] == "mse"
                else pb.Loss(cross_entropy=pb.CrossEntropyLoss()))
        for precision, tolerance in (("float64", 1e-9), ("float32", 1e-4)):
            case = ref[precision]
            onnx_bytes = (args.data / case["file"]).read_bytes()
            model = pb.Model(onnx=pb.OnnxModel(
                model=onnx_bytes, disable_dropout=ref["options"].get("disable_dropout", False)),
                loss=loss)

            def batch_tensor(t):
                return to_tensor(json_array(t), precision if t["dtype"] != "int64" else "int64")

            graph_inputs = [pb.NamedTensor(name=k, tensor=batch_tensor(v))
                            for k, v in ref["inputs"].items()]
            graph_inputs.append(pb.NamedTensor(name="target", tensor=batch_tensor(ref["target"])))
            request = pb.ComputeGradientsRequest(model=model, graph_inputs=graph_inputs)
            label = f"{name} {precision} ({case['file']}, {len(onnx_bytes)} bytes)"
            try:
                response = stub.ComputeGradients(request, timeout=TIMEOUT)
            except grpc.RpcError as e:
                check(False, f"{label}: {e.code().name}: {e.details()}")
                continue
            got = {g.name: from_tensor(g.tensor) for g in response.named_gradients}
            want = {k: json_array(v) for k, v in case["gradients"].items()}
            check(set(got) == set(want),
                  f"{label}: gradients by initializer name {sorted(got)} == PyTorch's "
                  f"named_parameters {sorted(want)}")
            worst = max((rel_error(got[k], want[k]) for k in want if k in got), default=1.0)
            check(worst <= tolerance, f"{label}: worst relative gradient error {worst:.3g} "
                                      f"<= {tolerance:g}")
            loss_error = abs(response.loss - case["loss"]) / max(abs(case["loss"]), 1e-30)
            check(loss_error <= tolerance, f"{label}: loss {response.loss!r} vs PyTorch "
                                           f"{case['loss']!r} (relative {loss_error:.3g})")

            # A stream sends the file once; the first step's answer is the unary call's.
            dtype = wire[precision][0]
            messages = [pb.StreamGradientsRequest(setup=pb.StreamSetup(model=model, dtype=dtype)),
                        pb.StreamGradientsRequest(step=pb.StreamStep(graph_inputs=graph_inputs))]
            try:
                answers = list(stub.StreamGradients(iter(messages), timeout=TIMEOUT))
                same = (len(answers) == 1 and answers[0].result.loss == response.loss and
                        [g.tensor.data for g in answers[0].result.named_gradients] ==
                        [g.tensor.data for g in response.named_gradients])
                check(same, f"{label}: a stream answers bit-identically to the unary call")
            except grpc.RpcError as e:
                check(False, f"{label} stream: {e.code().name}: {e.details()}")

            # Parameters sent by name replace the file's: zeros for the first one must change
            # the answer, and sending the file's own values must not.
            first = response.named_gradients[0].name if response.named_gradients else None
            if first is not None and precision == "float64":
                shape = list(response.named_gradients[0].tensor.shape)
                zero = pb.NamedTensor(name=first, tensor=to_tensor(np.zeros(shape), precision))
                changed = stub.ComputeGradients(pb.ComputeGradientsRequest(
                    model=model, graph_inputs=graph_inputs, named_parameters=[zero]),
                    timeout=TIMEOUT)
                check(changed.loss != response.loss,
                      f"{label}: named_parameters [{first!r} = 0] replaces the file's value")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
