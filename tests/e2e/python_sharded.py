#!/usr/bin/python3
"""End to end: client/python/gradserve/sharded.py against 3 real gradserve replicas.

    tests/e2e/python_sharded.py --gradserve SERVER_BINARY --source-dir SOURCE_DIR

For a chain MLP (float32 and float64, cross-entropy MEAN; and MSE SUM) and a graph model
(cross-entropy over [B, T] positions, some ignored, so MEAN weighs parts by positions, not rows):
  1. the sharded gradients equal one server's on the whole batch, to float rounding;
  2. they are bit-identical to the same parts sent one by one to one server and combined by
     hand in float64 in part order (the split, the weights and the order are the client's
     only freedom, and the replicas compute the bits the single server does);
  3. with a replica stopped (SIGTERM, exit 0), its part is retried on the next one and the
     answer keeps its bits; restarted on its port, it takes its part again.
The optimizer service's C++ ShardedClient is compared with this one in scale_out.py.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np

failures = []


def check(ok, what):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradserve", required=True)
    parser.add_argument("--source-dir", required=True)
    args = parser.parse_args()
    source = os.path.abspath(args.source_dir)

    with tempfile.TemporaryDirectory(prefix="gradserve-sharded-") as work:
        subprocess.run([f"{source}/client/python/generate.sh", f"{work}/stubs"], check=True,
                       stdout=subprocess.DEVNULL)
        sys.path[:0] = [f"{work}/stubs", f"{source}/client/python", f"{source}/tests/e2e"]
        from gradserve import client as gc
        from gradserve import graph as gg
        from gradserve.client import pb
        from gradserve.sharded import ShardedClient, split_rows
        from local_cluster import Cluster

        def chain_case(dtype, loss, batch=64):
            rng = np.random.default_rng(1)
            request = pb.ComputeGradientsRequest()
            for i, (n_in, n_out) in enumerate([(16, 32), (32, 4)]):
                if i:
                    request.model.layers.add().relu.SetInParent()
                request.model.layers.add().linear.CopyFrom(pb.Linear(in_features=n_in,
                                                                     out_features=n_out))
                bound = 1 / np.sqrt(n_in)
                request.parameters.add(
                    weight=gc.to_tensor(rng.uniform(-bound, bound, (n_out, n_in)), dtype),
                    bias=gc.to_tensor(rng.uniform(-bound, bound, n_out), dtype))
            request.model.loss.CopyFrom(loss)
            request.inputs.CopyFrom(gc.to_tensor(rng.standard_normal((batch, 16)), dtype))
            if loss.HasField("cross_entropy"):
                request.targets.CopyFrom(gc.to_tensor(rng.integers(0, 4, batch), np.int64))
            else:
                request.targets.CopyFrom(gc.to_tensor(rng.standard_normal((batch, 4)), dtype))
            return request

        def graph_case(batch=10, steps=6, d=8, vocab=5):
            rng = np.random.default_rng(2)
            b = gg.GraphBuilder()
            b.input("x", np.float64)
            b.input("y", np.int64)
            b.parameter("w", (d, vocab))
            logits = b.node("MatMul", ["x", "w"], name="logits")
            request = pb.ComputeGradientsRequest(
                model=b.model(gc.loss("cross_entropy"), logits, "y"))
            y = rng.integers(0, vocab, (batch, steps))
            y[rng.random((batch, steps)) < 0.4] = -100
            y[4:7] = -100  # The second part's positions all ignored: it must weigh nothing.
            request.graph_inputs.extend(gc.named_tensors(
                {"x": rng.standard_normal((batch, steps, d)), "y": y}))
            request.named_parameters.extend(gc.named_tensors(
                {"w": rng.standard_normal((d, vocab))}))
            return request

        def arrays(response):
            if response.named_gradients:
                return gc.named_arrays(response.named_gradients)
            out = {}
            for i, g in enumerate(response.gradients):
                out[f"{i}.weight"] = gc.from_tensor(g.weight)
                out[f"{i}.bias"] = gc.from_tensor(g.bias)
            return out

        def by_hand(single, request, shards):
            """The parts sent one by one to `single`, combined in float64 in part order."""
            graph = request.model.HasField("graph")
            batch = (request.graph_inputs[0].tensor.shape[0] if graph
                     else request.inputs.shape[0])
            mean = request.model.loss.reduction != pb.REDUCTION_SUM
            sums, loss, total = {}, 0.0, 0.0
            for begin, rows in split_rows(batch, shards):
                part = pb.ComputeGradientsRequest()
                part.CopyFrom(request)
                if graph:
                    part.ClearField("graph_inputs")
                    part.graph_inputs.extend(gc.named_tensors(
                        {k: v[begin:begin + rows]
                         for k, v in gc.named_arrays(request.graph_inputs).items()}))
                    weight = float(np.count_nonzero(gc.named_arrays(part.graph_inputs)["y"]
                                                    != -100))
                else:
                    part.inputs.CopyFrom(gc.to_tensor(
                        gc.from_tensor(request.inputs)[begin:begin + rows]))
                    part.targets.CopyFrom(gc.to_tensor(
                        gc.from_tensor(request.targets)[begin:begin + rows]))
                    weight = float(rows)
                if not mean:
                    weight = 1.0
                if weight == 0:
                    continue
                answer = single.ComputeGradients(part, timeout=30)
                for name, g in arrays(answer).items():
                    sums[name] = sums.get(name, np.zeros(g.shape)) + g.astype(np.float64) * weight
                    sums[name + ":dtype"] = g.dtype
                loss += weight * answer.loss
                total += weight
            divisor = total if mean else 1.0
            return ({k: (v / divisor).astype(sums[k + ":dtype"]) for k, v in sums.items()
                     if not k.endswith(":dtype")}, loss / divisor)

        cases = [
            ("chain float32, cross-entropy MEAN", chain_case(np.float32, gc.loss("cross_entropy")),
             1e-5),
            ("chain float64, cross-entropy MEAN", chain_case(np.float64, gc.loss("cross_entropy")),
             1e-12),
            ("chain float64, MSE SUM", chain_case(np.float64, gc.loss("mse", "sum")), 1e-12),
            ("graph float64, cross-entropy MEAN with ignored positions", graph_case(), 1e-12),
        ]

        with Cluster(work) as cluster:
            replicas = [cluster.gradserve(args.gradserve, "--threads", "1") for _ in range(3)]
            single = gc.stub(replicas[0].channel())
            sharded = ShardedClient([r.channel() for r in replicas], initial_backoff=0.05)
            answers = {}
            for name, request, rtol in cases:
                print(name)
                whole = arrays(single.ComputeGradients(request, timeout=30))
                response = sharded.compute_gradients(request)
                got = arrays(response)
                check(list(got) == list(whole), f"the same gradients by name: {list(got)}")
                worst = max(float(np.max(np.abs(got[k] - whole[k]) /
                                         np.maximum(np.abs(whole[k]), 1e-3))) for k in whole)
                check(worst <= rtol, f"equal to one server's on the whole batch: max relative "
                                     f"difference {worst:.3g} (<= {rtol:g})")
                hand, hand_loss = by_hand(single, request, 3)
                same = all(got[k].tobytes() == hand[k].tobytes() for k in hand)
                check(same and response.loss == hand_loss,
                      "bit-identical to the parts combined by hand in float64 "
                      f"(loss {response.loss!r} vs {hand_loss!r})")
                answers[name] = (request, response.SerializeToString())

            print("replica 1 stopped, then restarted on its port")
            stopped = replicas[1]
            check(stopped.stop(signal.SIGTERM) == 0, "replica 1 exits 0 on SIGTERM")
            for name, (request, expected) in answers.items():
                again = sharded.compute_gradients(request).SerializeToString()
                check(again == expected, f"{name}: its part retried on replica 2, same bits")
            stopped.start()
            for name, (request, expected) in answers.items():
                again = sharded.compute_gradients(request).SerializeToString()
                check(again == expected, f"{name}: with replica 1 back, same bits")
            stats = gc.stub(stopped.channel()).GetStats(pb.GetStatsRequest(), timeout=10)
            calls = {m.method: m.calls for m in stats.methods}
            check(calls.get("ComputeGradients") == len(answers),
                  f"the restarted replica 1 took its part of each: {calls}")
            sharded.close()
            for i, replica in enumerate(replicas):
                check(replica.stop() == 0, f"replica {i} exits 0 on SIGTERM")

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
