"""Checks gradserve.client.TrainingStream (StreamGradients from Python) against a real server.

    python_stream.py --target 127.0.0.1:PORT --stubs DIR --client-dir client/python

A 30-step SGD loop on one stream, sending only the update after the first step, must answer
bit-identically to the same loop of unary ComputeGradients calls; micro-batches must accumulate
to the whole batch's gradients; tensors above chunk_bytes must travel as chunks; and a bad step
must raise the server's INVALID_ARGUMENT naming the message. Exits non-zero on any failure.
"""

import argparse
import sys
from pathlib import Path

TIMEOUT = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--stubs", required=True, type=Path)
    parser.add_argument("--client-dir", required=True, type=Path)
    args = parser.parse_args()
    # Stubs first, so that "gradserve.v1" is the freshly generated package, then the library.
    sys.path[:0] = [str(args.stubs.resolve()), str(args.client_dir.resolve())]
    import grpc
    import numpy as np

    from gradserve import client as gc
    from gradserve.v1 import gradserve_pb2 as pb

    channel = gc.connect(args.target)
    stub = gc.stub(channel)
    rng = np.random.default_rng(5)
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    # 8 -> 16 tanh -> 3, cross-entropy.
    model = pb.Model(layers=[
        pb.Layer(linear=pb.Linear(in_features=8, out_features=16)),
        pb.Layer(tanh=pb.Tanh()),
        pb.Layer(linear=pb.Linear(in_features=16, out_features=3)),
    ], loss=gc.loss("cross_entropy"))
    params = [(rng.standard_normal((16, 8)).astype(np.float32) * 0.3,
               rng.standard_normal(16).astype(np.float32) * 0.1),
              (rng.standard_normal((3, 16)).astype(np.float32) * 0.3,
               rng.standard_normal(3).astype(np.float32) * 0.1)]
    lr = np.float32(0.1)

    def unary(params, x, y):
        request = pb.ComputeGradientsRequest(model=model, inputs=gc.to_tensor(x),
                                             targets=gc.to_tensor(y))
        for w, b in params:
            request.parameters.add(weight=gc.to_tensor(w), bias=gc.to_tensor(b))
        return stub.ComputeGradients(request, timeout=TIMEOUT)

    # 1. Thirty SGD steps: the stream gets the update, the unary calls the updated parameters.
    identical = True
    losses = []
    with gc.TrainingStream(channel, model, np.float32, timeout=120) as stream:
        update = None
        for step in range(30):
            x = rng.standard_normal((32, 8)).astype(np.float32)
            y = rng.integers(0, 3, 32).astype(np.int64)
            expected = unary(params, x, y)
            answer = (stream.step(x, y, parameters=params) if step == 0
                      else stream.step(x, y, update=update))
            got = answer.result
            identical &= answer.step_index == step and got.loss == expected.loss
            for g, e in zip(got.gradients, expected.gradients):
                identical &= g.weight.data == e.weight.data and g.bias.data == e.bias.data
            losses.append(got.loss)
            grads = gc.gradients(got)
            update = [(-lr * dw, -lr * db) for dw, db in grads]
            params = [(w + u, b + v) for (w, b), (u, v) in zip(params, update)]
    check(identical, "30 SGD steps on one stream are bit-identical to 30 unary calls")
    check(losses[-1] < losses[0], f"the loop trains (loss {losses[0]:.4f} -> {losses[-1]:.4f})")

    # 2. Micro-batches 10 + 6 + 16 answer as one call on the 32 examples (float64, to rounding),
    #    with the inputs (32 x 8 x 8 = 2 KiB) and first weight sent in 500-byte chunks.
    params64 = [(w.astype(np.float64), b.astype(np.float64)) for w, b in params]
    x = rng.standard_normal((32, 8))
    y = rng.integers(0, 3, 32).astype(np.int64)
    whole = unary(params64, x, y)
    with gc.TrainingStream(channel, model, np.float64, timeout=60, chunk_bytes=500) as stream:
        parts = [(0, 10), (10, 16), (16, 32)]
        answers = [stream.step(x[a:b], y[a:b], parameters=params64 if a == 0 else None,
                               accumulate=b < 32) for a, b in parts]
    check(answers[0] is None and answers[1] is None, "accumulating steps are not answered")
    combined = answers[2]
    check(combined.micro_batches == 3 and combined.result.stats.num_examples == 32,
          "the answer combines 3 micro-batches of 32 examples")
    close = abs(combined.result.loss - whole.loss) <= 1e-12 * abs(whole.loss)
    for (dw, db), (ew, eb) in zip(gc.gradients(combined.result), gc.gradients(whole)):
        close &= bool(np.allclose(dw, ew, rtol=1e-12, atol=1e-14))
        close &= bool(np.allclose(db, eb, rtol=1e-12, atol=1e-14))
    check(close, "accumulated micro-batches equal one call on the whole batch to 1e-12")

    # 3. A step of the wrong width ends the stream with the server's status.
    try:
        with gc.TrainingStream(channel, model, np.float32, timeout=30) as stream:
            stream.step(np.zeros((4, 7), np.float32), np.zeros(4, np.int64), parameters=params)
        check(False, "a bad step raises")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.INVALID_ARGUMENT
              and "message 1 (step)" in error.details(),
              f"a bad step raises INVALID_ARGUMENT naming the message ({error.details()!r})")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
