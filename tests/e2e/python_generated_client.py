#!/usr/bin/python3
"""Acceptance check: a Python client generated from the .proto alone calls gradserve.

    python_generated_client.py --proto proto/gradserve/v1/gradserve.proto --target HOST:PORT

Generates stubs with protoc + grpc_python_plugin into a temporary directory and imports only
those: no project Python code, so this proves the .proto is self-sufficient for a third party.
Then calls GetServerInfo, ComputeGradients on the demo network (batch 8, Linear 4->2, ReLU,
MSE, float64) checked against the closed form computed here with numpy, and one malformed
request that must fail with INVALID_ARGUMENT naming "inputs.data". Exits non-zero on failure.
"""

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

RTOL = 1e-12


def generate_stubs(proto: Path, plugin: str, out_dir: Path):
    """Runs protoc on the proto alone and imports the two generated modules."""
    # A private copy of the proto as the only include root: the generated modules are then
    # top-level (gradserve_pb2, gradserve_pb2_grpc) and nothing from the repository can leak
    # onto the import path.
    src = out_dir / "proto"
    src.mkdir()
    shutil.copy(proto, src / proto.name)
    command = ["protoc", f"-I{src}", f"--python_out={out_dir}",
               f"--plugin=protoc-gen-grpc_python={plugin}", f"--grpc_python_out={out_dir}",
               str(src / proto.name)]
    subprocess.run(command, check=True)
    sys.path.insert(0, str(out_dir))
    stem = proto.stem
    return importlib.import_module(f"{stem}_pb2"), importlib.import_module(f"{stem}_pb2_grpc")


def tensor(pb, array: np.ndarray):
    """float64 array -> Tensor, packed by hand from the documented wire format."""
    return pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=list(array.shape),
                     data=np.ascontiguousarray(array).astype("<f8").tobytes())


def array(pb, t) -> np.ndarray:
    if t.dtype != pb.DTYPE_FLOAT64:
        raise AssertionError(f"expected a FLOAT64 tensor, got {pb.DType.Name(t.dtype)}")
    return np.frombuffer(t.data, dtype="<f8").reshape(tuple(t.shape)).astype(np.float64)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want|; shape mismatch is a failure in its own right."""
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape}, expected {want.shape}")
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), np.finfo(float).tiny))


def demo_request(pb, rng):
    """The demo network, plus the numpy closed-form loss and gradients to expect."""
    batch, n_in, n_out = 8, 4, 2
    x = rng.standard_normal((batch, n_in))
    w = rng.standard_normal((n_out, n_in))
    b = rng.standard_normal(n_out)
    t = rng.standard_normal((batch, n_out))

    z = x @ w.T + b
    a = np.maximum(z, 0.0)
    loss = np.mean((a - t) ** 2)
    # dL/da for the mean over all batch*n_out elements, then through ReLU (0 where z <= 0).
    delta = (2.0 / (batch * n_out)) * (a - t) * (z > 0)
    # The check only means something if ReLU passes some units and blocks others.
    assert 0 < np.count_nonzero(z > 0) < z.size, "seed gives a degenerate ReLU mask"
    expected = {"loss": loss, "dW": delta.T @ x, "db": delta.sum(axis=0), "dx": delta @ w}

    request = pb.ComputeGradientsRequest()
    request.model.layers.add(name="fc").linear.CopyFrom(
        pb.Linear(in_features=n_in, out_features=n_out))
    request.model.layers.add().relu.SetInParent()
    request.model.loss.mse.SetInParent()
    request.model.loss.reduction = pb.REDUCTION_MEAN
    request.parameters.add(weight=tensor(pb, w), bias=tensor(pb, b))
    request.inputs.CopyFrom(tensor(pb, x))
    request.targets.CopyFrom(tensor(pb, t))
    request.options.return_input_gradient = True
    return request, expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto", required=True, type=Path, help="path to gradserve.proto")
    parser.add_argument("--target", required=True, help="server host:port")
    parser.add_argument("--plugin", default="/usr/bin/grpc_python_plugin")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    args = parser.parse_args()

    failures = []

    def check(ok: bool, what: str):
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory(prefix="gradserve-pystubs-") as tmp:
        pb, pb_grpc = generate_stubs(args.proto.resolve(), args.plugin, Path(tmp))
        print(f"generated {pb.__name__}, {pb_grpc.__name__} from {args.proto} into {tmp}")

        with grpc.insecure_channel(args.target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)

            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=args.timeout)
            print(f"GetServerInfo: version {info.version}, api {info.api}")
            check(info.api == "gradserve.v1", f'api == "gradserve.v1" (got "{info.api}")')
            check({"linear", "relu"} <= set(info.layers), "layers include linear, relu")
            check("mse" in info.losses, "losses include mse")
            check(pb.DTYPE_FLOAT64 in info.dtypes, "dtypes include DTYPE_FLOAT64")

            request, want = demo_request(pb, np.random.default_rng(7))
            response = stub.ComputeGradients(request, timeout=args.timeout)
            print("ComputeGradients: Linear(4->2) -> ReLU -> MSE(mean), batch 8, float64")
            check(len(response.gradients) == 1, "one LinearGradients entry")
            if len(response.gradients) == 1:
                got = {
                    "loss": np.float64(response.loss),
                    "dW": array(pb, response.gradients[0].weight),
                    "db": array(pb, response.gradients[0].bias),
                    "dx": array(pb, response.input_gradient),
                }
                for name in ("loss", "dW", "db", "dx"):
                    err = rel_err(np.atleast_1d(got[name]), np.atleast_1d(want[name]))
                    check(err <= RTOL, f"{name}: relative error {err:.2e} <= {RTOL:.0e}")

            # The data is one double short of 8x4: the server must name the field, not crash
            # or compute on garbage.
            bad = pb.ComputeGradientsRequest()
            bad.CopyFrom(request)
            bad.inputs.data = bad.inputs.data[:-8]
            try:
                stub.ComputeGradients(bad, timeout=args.timeout)
                check(False, "truncated inputs.data rejected (the call succeeded)")
            except grpc.RpcError as error:
                print(f"malformed request: {error.code().name}: {error.details()}")
                check(error.code() == grpc.StatusCode.INVALID_ARGUMENT,
                      f"truncated inputs.data -> INVALID_ARGUMENT (got {error.code().name})")
                check("inputs.data" in (error.details() or ""),
                      'error message names "inputs.data"')

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("PASS: generated Python client works against the server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
