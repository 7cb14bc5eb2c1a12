"""The installed gradserve package against a real server (run by python_package.sh).

    python_package_check.py --target 127.0.0.1:PORT

A Linear -> Tanh -> Linear -> MSE chain from a state_dict, in float64, against the same
forward and backward pass written here in numpy; the gradients come back under the state_dict's
keys; a TrainingStream step answers exactly as the unary call; a bad request is refused with
INVALID_ARGUMENT naming the field; health answers SERVING.
"""

import argparse
import sys

import grpc
import numpy as np

import gradserve
from gradserve import pb

failures = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what)
    if not condition:
        failures.append(what)


def reference(state, x, y):
    """Loss and gradients of mean((tanh(x W0^T + b0) W2^T + b2 - y)^2), by hand."""
    z0 = x @ state["0.weight"].T + state["0.bias"]
    a0 = np.tanh(z0)
    out = a0 @ state["2.weight"].T + state["2.bias"]
    loss = np.mean((out - y) ** 2)
    d_out = 2.0 * (out - y) / out.size
    grads = {"2.weight": d_out.T @ a0, "2.bias": d_out.sum(axis=0)}
    d_z0 = (d_out @ state["2.weight"]) * (1.0 - a0 ** 2)
    grads.update({"0.weight": d_z0.T @ x, "0.bias": d_z0.sum(axis=0)})
    return loss, grads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    args = parser.parse_args()

    channel = gradserve.connect(args.target)
    check(gradserve.health(channel) == "SERVING", "health: SERVING")
    stub = gradserve.stub(channel)

    rng = np.random.default_rng(11)
    state = {"0.weight": rng.normal(size=(5, 4)), "0.bias": rng.normal(size=5),
             "2.weight": rng.normal(size=(3, 5)), "2.bias": rng.normal(size=3)}
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 3))
    model = pb.Model(layers=[pb.Layer(linear=pb.Linear(in_features=4, out_features=5)),
                             pb.Layer(tanh=pb.Tanh()),
                             pb.Layer(linear=pb.Linear(in_features=5, out_features=3))],
                     loss=gradserve.loss("mse"))
    request = pb.ComputeGradientsRequest(
        model=model, parameters=gradserve.parameters_from_state_dict(model, state),
        inputs=gradserve.to_tensor(x), targets=gradserve.to_tensor(y))
    response = stub.ComputeGradients(request, timeout=30)
    loss, expected = reference(state, x, y)
    check(abs(response.loss - loss) <= 1e-13 * abs(loss), f"loss {response.loss!r} == {loss!r}")
    grads = gradserve.state_dict_gradients(model, response)
    check(sorted(grads) == sorted(expected), f"gradients under the state_dict keys {sorted(grads)}")
    for key, value in expected.items():
        error = np.max(np.abs(grads[key] - value)) / np.max(np.abs(value))
        check(error < 1e-13, f"{key}: relative error {error:.2e} against numpy")

    with gradserve.TrainingStream(channel, model, dtype=np.float64) as stream:
        answer = stream.step(x, y, parameters=[(state["0.weight"], state["0.bias"]),
                                               (state["2.weight"], state["2.bias"])])
    streamed = gradserve.state_dict_gradients(model, answer.result)
    check(answer.result.loss == response.loss and all(
        np.array_equal(streamed[k], grads[k]) for k in grads),
        "a TrainingStream step answers bit for bit as the unary call")

    bad = pb.ComputeGradientsRequest()
    bad.CopyFrom(request)
    bad.inputs.shape[1] = 7
    try:
        stub.ComputeGradients(bad, timeout=30)
        check(False, "a wrong input shape is refused")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in error.details(),
              f"a wrong input shape: {error.code().name}: {error.details()}")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
