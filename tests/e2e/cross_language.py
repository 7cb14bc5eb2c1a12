#!/usr/bin/python3
"""The Python, Node and C++ clients get bit-identical gradients for the same request.

    cross_language.py --gradserve BIN --cpp-client BIN --source DIR --work DIR
                      --node-modules DIR

Each client builds one fixed ComputeGradients request on its own (float64, then float32; the
model and the data formula are specified in client/node/bin/gradients-hex.js), sends it to the
same server and prints the answer's bytes as hex lines: the Python package (here), the Node
package (client/node/bin/gradients-hex.js, on the npm dependencies tests/e2e/node_install.sh
installed from the lockfile) and the C++ client library (tests/e2e/gradients_hex.cc). The three texts must be
equal byte for byte: same tensors on the wire both ways, whatever the language.
"""

import argparse
import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

LAYERS = [(4, 8), (8, 8), (8, 3)]  # (in, out)
BATCH = 5


def filled(np, dtype, salt, shape):
    """value(s, i) = ((37 i + 11 s) mod 101) / 50 - 1, row-major, rounded once to dtype."""
    count = int(np.prod(shape))
    integers = (37 * np.arange(count, dtype=np.int64) + 11 * salt) % 101
    values = integers.astype(np.float64) / 50.0 - 1.0
    return values.astype(dtype).reshape(shape)


def python_text(target):
    import numpy as np

    import gradserve
    from gradserve import pb

    stub = gradserve.stub(gradserve.connect(target))
    lines = []

    def line(kase, name, tensor):
        shape = "x".join(str(d) for d in tensor.shape)
        lines.append(f"{kase} {name} {pb.DType.Name(tensor.dtype)} {shape} {tensor.data.hex()}")

    for kase, dtype in (("float64", np.float64), ("float32", np.float32)):
        model = pb.Model(loss=gradserve.loss("mse"))
        for k, (n_in, n_out) in enumerate(LAYERS):
            model.layers.add().linear.CopyFrom(pb.Linear(in_features=n_in, out_features=n_out))
            if k == 0:
                model.layers.add().tanh.SetInParent()
            elif k == 1:
                model.layers.add().relu.SetInParent()
        state = {}
        for k, (n_in, n_out) in enumerate(LAYERS):
            index = 2 * k  # Linear layers sit at 0, 2, 4
            state[f"{index}.weight"] = filled(np, dtype, 2 + 2 * k, (n_out, n_in))
            state[f"{index}.bias"] = filled(np, dtype, 3 + 2 * k, (n_out,))
        request = pb.ComputeGradientsRequest(
            model=model, parameters=gradserve.parameters_from_state_dict(model, state),
            inputs=gradserve.to_tensor(filled(np, dtype, 0, (BATCH, 4))),
            targets=gradserve.to_tensor(filled(np, dtype, 1, (BATCH, 3))))
        request.options.return_input_gradient = True
        response = stub.ComputeGradients(request, timeout=60)
        line(kase, "loss", pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1],
                                     data=np.array([response.loss], "<f8").tobytes()))
        for k, grads in enumerate(response.gradients):
            line(kase, f"gradients[{k}].weight", grads.weight)
            line(kase, f"gradients[{k}].bias", grads.bias)
        line(kase, "input_gradient", response.input_gradient)
    return "".join(f"{text}\n" for text in lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gradserve", required=True)
    parser.add_argument("--cpp-client", required=True)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--node-modules", required=True, type=Path)
    args = parser.parse_args()
    source, work = args.source.resolve(), args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    subprocess.run([str(source / "client" / "python" / "generate.sh"), str(work / "py")],
                   check=True, stdout=subprocess.DEVNULL)
    sys.path[:0] = [str(work / "py"), str(source / "tests" / "e2e")]
    from local_cluster import Cluster

    with Cluster(str(work)) as cluster:
        server = cluster.gradserve(args.gradserve, "--threads", "2")
        texts = {"python": python_text(server.target)}
        texts["node"] = subprocess.run(
            ["node", str(source / "client" / "node" / "bin" / "gradients-hex.js"),
             "--target", server.target], check=True, capture_output=True, text=True,
            env=dict(os.environ, NODE_PATH=str(args.node_modules.resolve()))).stdout
        texts["c++"] = subprocess.run([args.cpp_client, "--target", server.target], check=True,
                                      capture_output=True, text=True).stdout
        exit_code = server.stop()

    failures = 0
    lines = texts["python"].splitlines()
    if len(lines) != 16 or any(len(line.split(" ")) != 5 for line in lines):
        print(f"FAIL python printed {len(lines)} lines, not 16 of 5 fields")
        failures += 1
    for language in ("node", "c++"):
        if texts[language] == texts["python"]:
            print(f"ok   {language}: {len(texts[language])} bytes, identical to python's")
        else:
            failures += 1
            print(f"FAIL {language} differs from python:")
            sys.stdout.writelines(difflib.unified_diff(
                texts["python"].splitlines(True), texts[language].splitlines(True),
                "python", language))
    if exit_code != 0:
        print(f"FAIL gradserve exited {exit_code} on SIGTERM")
        failures += 1
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
