#!/usr/bin/python3
"""Scale-out, end to end on local processes: 3 gradserve replicas and a gradserve-optimizer
training a chain MLP (16 -> 32 ReLU -> 4, cross-entropy MEAN, Adam, batch 64) on a synthetic
data set, steps driven by the test (Step with expected_step).

    tests/e2e/scale_out.py --gradserve GRADSERVE --optimizer GRADSERVE_OPTIMIZER --source-dir DIR

  a. Sharding: in float64, a run split in 3 parts over 3 replicas follows a run on 1 replica
     to rounding (losses and parameters, rtol 1e-12), and a run with the same split over the
     replicas in another order is bit-identical. One SGD step with lr = 1 from float32 values
     exposes the optimizer's gradient exactly (p1 = p0 - g, one rounding): it equals the Python
     ShardedClient's (client/python/gradserve/sharded.py) on the same split, bit for bit.
  b. Rolling restart: while a thread steps a run continuously, each replica in turn gets
     SIGTERM (exit 0 expected) and is restarted on its port, with steps taken while it is
     down; no Step fails, and the parameters equal, bit for bit, those of a run never
     disturbed after as many steps.
  c. SIGKILL of the optimizer 3 steps after its checkpoint at step 10 (checkpoint_every 5;
     the run given with --run, the same flags again on restart): the run comes back at step 10
     (GetRun.step and checkpoint_step), a run checkpointed exactly at its step comes back with
     the same parameters, and stepping on to 20 gives parameters bit-identical to a run never
     interrupted.
  d. SIGTERM of the optimizer at step 23: exit 0, <state-dir>/<run_id>.npz holds step 23 and
     loads with numpy.load with the documented keys (spec, step, loss, param/<name>,
     state/<name>/exp_avg, exp_avg_sq), the parameters as GetParameters gave them; restarted,
     the run is at step 23.
Exits non-zero if any check fails; prints each check and the largest differences.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

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
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--source-dir", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    source = os.path.abspath(args.source_dir)

    work = tempfile.mkdtemp(prefix="gradserve-scale-out-")
    try:
        rc = run(args, source, work)
    finally:
        if args.keep or failures:
            print(f"work directory (logs, state): {work}")
        else:
            subprocess.run(["rm", "-rf", work], check=False)
    return rc


def run(args, source, work):
    subprocess.run([f"{source}/client/python/generate.sh", f"{work}/stubs"], check=True,
                   stdout=subprocess.DEVNULL)
    sys.path[:0] = [f"{work}/stubs", f"{source}/client/python", f"{source}/tests/e2e"]
    import grpc
    from google.protobuf import json_format

    from gradserve import client as gc
    from gradserve.optimizer.v1 import optimizer_pb2 as opb
    from gradserve.optimizer.v1 import optimizer_pb2_grpc as opb_grpc
    from gradserve.client import pb
    from gradserve.sharded import ShardedClient
    from local_cluster import Cluster

    # The data set: 512 examples of 16 features, 4 classes from a random linear teacher, so
    # that training has something to learn.
    data_dir, state_dir = f"{work}/data", f"{work}/state"
    os.makedirs(data_dir)
    os.makedirs(state_dir)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((512, 16)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((16, 4)), axis=1).astype(np.int64)
    np.save(f"{data_dir}/x.npy", x)
    np.save(f"{data_dir}/y.npy", y)

    def model(dtype=np.float32):
        m = pb.Model(loss=gc.loss("cross_entropy"))
        m.layers.add().linear.CopyFrom(pb.Linear(in_features=16, out_features=32))
        m.layers.add().relu.SetInParent()
        m.layers.add().linear.CopyFrom(pb.Linear(in_features=32, out_features=4))
        return m

    def spec(run_id, targets, shards=0, dtype=pb.DTYPE_FLOAT32, checkpoint_every=5,
             optimizer=None):
        return opb.RunSpec(
            run_id=run_id, model=model(), dtype=dtype, init_seed=7,
            optimizer=optimizer or opb.OptimizerConfig(
                algorithm=opb.OptimizerConfig.ALGORITHM_ADAM, lr=0.01),
            gradserve_targets=[r.target for r in targets], shards=shards,
            dataset=opb.Dataset(inputs="x.npy", targets="y.npy", batch_size=64, shuffle_seed=3),
            checkpoint_every=checkpoint_every)

    with Cluster(work) as cluster:
        replicas = [cluster.gradserve(args.gradserve, "--threads", "1", name=f"gradserve{i}")
                    for i in range(3)]
        run_file = f"{work}/crash.json"
        with open(run_file, "w") as f:
            f.write(json_format.MessageToJson(spec("crash", replicas)))
        # The calls take milliseconds, so a short grace is plenty. Restarts reuse the port.
        optimizer = cluster.add(
            "optimizer", args.optimizer, "--state-dir", state_dir, "--data-dir", data_dir,
            "--run", run_file, "--checkpoint-every", "100", "--shutdown-grace", "5",
            *[a for r in replicas for a in ("--gradserve", r.target)])
        stub = opb_grpc.OptimizerServiceStub(optimizer.channel())

        def create(s):
            status = stub.CreateRun(opb.CreateRunRequest(spec=s), timeout=30)
            check(status.step == 0, f"CreateRun {s.run_id}: step {status.step}")

        def step(run_id, k, **batch):
            return stub.Step(opb.StepRequest(run_id=run_id, expected_step=k, **batch),
                             timeout=60)

        def steps(run_id, begin, end):
            return [step(run_id, k) for k in range(begin, end)]

        def parameters(run_id):
            answer = stub.GetParameters(opb.GetParametersRequest(run_id=run_id), timeout=30)
            return answer.step, gc.named_arrays(answer.parameters)

        def same_bits(a, b):
            return list(a) == list(b) and all(a[k].dtype == b[k].dtype and
                                              a[k].tobytes() == b[k].tobytes() for k in a)

        # --- a. Sharding -----------------------------------------------------------------------
        print("a. 3 parts over 3 replicas against 1 replica, float64, 20 steps")
        f64 = pb.DTYPE_FLOAT64
        create(spec("a3", replicas, 3, f64))
        create(spec("a1", replicas[:1], 1, f64))
        create(spec("a3-reordered", replicas[::-1], 3, f64))
        answers = {r: steps(r, 0, 20) for r in ("a3", "a1", "a3-reordered")}
        l3 = np.array([s.loss for s in answers["a3"]])
        l1 = np.array([s.loss for s in answers["a1"]])
        check(l3[-1] < l3[0], f"the loss falls: {l3[0]:.4f} -> {l3[-1]:.4f}")
        worst = float(np.max(np.abs(l3 - l1) / np.abs(l1)))
        check(worst <= 1e-12, f"losses of each step equal 1 replica's: max rel diff {worst:.3g}")
        p3, p1 = parameters("a3")[1], parameters("a1")[1]
        check(list(p3) == ["0.weight", "0.bias", "2.weight", "2.bias"],
              f"parameters named as nn.Sequential's state_dict: {list(p3)}")
        worst = max(float(np.max(np.abs(p3[k] - p1[k]) / np.maximum(np.abs(p1[k]), 1e-6)))
                    for k in p1)
        check(worst <= 1e-12, f"parameters after 20 steps equal 1 replica's: max rel diff "
                              f"{worst:.3g} (<= 1e-12)")
        check(all(p3[k].dtype == np.float64 for k in p3), "parameters come back in float64")
        check(same_bits(p3, parameters("a3-reordered")[1]) and
              [s.loss for s in answers["a3"]] == [s.loss for s in answers["a3-reordered"]],
              "the same split over the replicas in another order: bit-identical")
        s3, s1 = answers["a3"][0], answers["a1"][0]
        print(f"     bytes per step: 3 parts {s3.bytes_sent} sent, {s3.bytes_received} received;"
              f" 1 part {s1.bytes_sent} sent, {s1.bytes_received} received")
        check(s3.bytes_sent > s1.bytes_sent > 0 and s3.bytes_received > s1.bytes_received > 0,
              "bytes_sent and bytes_received count every part")

        print("a. the optimizer's C++ ShardedClient against the Python one, same split")
        p0 = {k: v.astype(np.float32) for k, v in parameters("a1")[1].items()}
        sgd = spec("sgd", replicas, 3, optimizer=opb.OptimizerConfig(
            algorithm=opb.OptimizerConfig.ALGORITHM_SGD, lr=1.0))
        for i in (0, 2):
            sgd.parameters.add(weight=gc.to_tensor(p0[f"{i}.weight"]),
                               bias=gc.to_tensor(p0[f"{i}.bias"]))
        create(sgd)
        batch_x, batch_y = x[100:164], y[100:164]
        answer = step("sgd", 0, inputs=gc.to_tensor(batch_x), targets=gc.to_tensor(batch_y))
        request = pb.ComputeGradientsRequest(model=model(), inputs=gc.to_tensor(batch_x),
                                             targets=gc.to_tensor(batch_y))
        for i in (0, 2):
            request.parameters.add(weight=gc.to_tensor(p0[f"{i}.weight"]),
                                   bias=gc.to_tensor(p0[f"{i}.bias"]))
        with ShardedClient([r.channel() for r in replicas]) as sharded:
            python = sharded.compute_gradients(request)
        expected = {}
        for i, g in zip((0, 2), python.gradients):
            expected[f"{i}.weight"] = p0[f"{i}.weight"].astype(np.float64) - \
                gc.from_tensor(g.weight).astype(np.float64)
            expected[f"{i}.bias"] = p0[f"{i}.bias"].astype(np.float64) - \
                gc.from_tensor(g.bias).astype(np.float64)
        got = parameters("sgd")[1]
        check(same_bits(got, expected),
              "SGD lr=1 from float32 parameters: p0 - g with the Python client's g, bit for bit"
              f" (max |diff| {max(float(np.max(np.abs(got[k] - expected[k]))) for k in got):.3g})")
        # NOTE: the loss is combined as weight * loss summed in float64; the C++ build may fuse
        # that multiply-add (-march=native), so the last bit may differ: not compared exactly.
        check(abs(answer.loss - python.loss) <= 1e-15 * abs(python.loss),
              f"step loss {answer.loss!r} vs the Python client's {python.loss!r}")

        # --- b. Rolling restart ----------------------------------------------------------------
        print("b. rolling restart of the replicas while stepping")
        create(spec("roll", replicas, 3))
        stepped = [0]
        errors = []
        progress = threading.Condition()
        done = threading.Event()

        seconds = []

        def stepper():
            k = 0
            while not done.is_set():
                start = time.monotonic()
                try:
                    step("roll", k)
                except grpc.RpcError as error:
                    errors.append(f"step {k}: {error.code().name}: {error.details()}")
                    return
                seconds.append(time.monotonic() - start)
                k += 1
                with progress:
                    stepped[0] = k
                    progress.notify_all()

        def wait_for_steps(count):
            with progress:
                return progress.wait_for(lambda: stepped[0] >= count or errors, timeout=60)

        thread = threading.Thread(target=stepper)
        thread.start()
        try:
            moving = wait_for_steps(3)
            for i, replica in enumerate(replicas):
                at_term, t_term = stepped[0], time.monotonic()
                rc = replica.stop(signal.SIGTERM)
                at_exit, t_exit = stepped[0], time.monotonic()
                # Steps taken while the replica is gone, whose parts must go elsewhere.
                moving = wait_for_steps(at_exit + 3) and moving
                t_start = time.monotonic()
                replica.start()
                at_back, t_back = stepped[0], time.monotonic()
                moving = wait_for_steps(at_back + 3) and moving
                check(rc == 0 and moving and not errors,
                      f"replica {i}: exit {rc} {t_exit - t_term:.2f} s after SIGTERM, back on "
                      f"port {replica.port} {t_back - t_exit:.2f} s later (start "
                      f"{t_back - t_start:.2f} s); steps {at_term} at SIGTERM, {at_exit} at "
                      f"exit, {at_back} when back")
        finally:
            done.set()
            thread.join()
        check(not errors, f"no Step failed: {errors or 'none'}")
        print(f"     step time: median {1000 * np.median(seconds):.1f} ms, "
              f"max {1000 * max(seconds):.0f} ms (a part sent to a replica that is going away "
              "waits for the channel's own retries before moving on)")
        total = stepped[0]
        create(spec("roll-ref", replicas, 3))
        steps("roll-ref", 0, total)
        n_roll, roll = parameters("roll")
        n_ref, ref = parameters("roll-ref")
        check(n_roll == n_ref == total and same_bits(roll, ref),
              f"after {total} steps: parameters bit-identical to a run without restarts")

        # --- c. SIGKILL of the optimizer ---------------------------------------------------------
        print("c. SIGKILL of the optimizer 3 steps after a checkpoint")
        status = stub.GetRun(opb.GetRunRequest(run_id="crash"), timeout=10)
        check(status.step == 0, f"the --run run exists at start: step {status.step}")
        steps("crash", 0, 13)
        create(spec("crash-ref", replicas))
        steps("crash-ref", 0, 20)
        at_20 = parameters("crash-ref")[1]
        status = stub.GetRun(opb.GetRunRequest(run_id="crash"), timeout=10)
        check((status.step, status.checkpoint_step) == (13, 10),
              f"before: step {status.step}, checkpoint_step {status.checkpoint_step} (13, 10)")
        rc = optimizer.stop(signal.SIGKILL)
        check(rc == -signal.SIGKILL, f"killed: {rc}")
        optimizer.start()
        status = stub.GetRun(opb.GetRunRequest(run_id="crash"), timeout=10)
        check((status.step, status.checkpoint_step) == (10, 10),
              f"restored: step {status.step}, checkpoint_step {status.checkpoint_step} (10, 10)")
        runs = stub.ListRuns(opb.ListRunsRequest(), timeout=10).run_ids
        check(list(runs) == sorted(runs) and {"a3", "roll", "crash", "crash-ref"} <= set(runs),
              f"every run restored: {list(runs)}")
        n, restored = parameters("crash-ref")
        check(n == 20 and same_bits(restored, at_20),
              "a run checkpointed at its step comes back with the same parameters")
        try:
            step("crash", 13)
            check(False, "a step expecting 13 is refused after the restore")
        except grpc.RpcError as error:
            check(error.code() == grpc.StatusCode.FAILED_PRECONDITION,
                  f"a step expecting 13 is refused: {error.code().name}: {error.details()}")
        steps("crash", 10, 20)
        n, resumed = parameters("crash")
        check(n == 20 and same_bits(resumed, at_20),
              "resumed to step 20: bit-identical to the run never interrupted")

        # --- d. SIGTERM of the optimizer ---------------------------------------------------------
        print("d. SIGTERM of the optimizer between checkpoints")
        last = steps("crash", 20, 23)[-1]
        n, before = parameters("crash")
        status = stub.GetRun(opb.GetRunRequest(run_id="crash"), timeout=10)
        losses = list(status.recent_losses)
        rc = optimizer.stop(signal.SIGTERM)
        check(rc == 0, f"exit {rc} after SIGTERM")
        path = f"{state_dir}/crash.npz"
        with np.load(path) as npz:
            keys = sorted(npz.files)
            print(f"     {os.path.basename(path)}: {keys}")
            names = ["0.weight", "0.bias", "2.weight", "2.bias"]
            want = {"spec", "step", "loss"} | {f"param/{k}" for k in names} | \
                {f"state/{k}/{s}" for k in names for s in ("exp_avg", "exp_avg_sq")}
            check(want <= set(keys), f"the documented keys, Adam's state among them; missing: "
                                     f"{sorted(want - set(keys)) or 'none'}")
            check(npz["step"].dtype == np.int64 and npz["step"].shape == () and
                  int(npz["step"]) == 23, f"step {npz['step']!r}: int64 [] 23")
            loss = npz["loss"]
            check(loss.dtype == np.float64 and loss.shape == (23,) and
                  loss[-1] == last.loss and list(loss[-len(losses):]) == losses,
                  f"loss: float64 [{loss.shape}], the losses the run reported")
            check(all(npz[f"param/{k}"].dtype == np.float64 and
                      npz[f"param/{k}"].tobytes() == before[k].tobytes() for k in names),
                  "param/<name>: float64, GetParameters' bits")
            saved = opb.RunSpec()
            saved.ParseFromString(npz["spec"].tobytes())
            check(npz["spec"].dtype == np.uint8 and saved.run_id == "crash" and
                  saved.optimizer.algorithm == opb.OptimizerConfig.ALGORITHM_ADAM,
                  "spec: uint8, the serialized RunSpec")
        optimizer.start()
        status = stub.GetRun(opb.GetRunRequest(run_id="crash"), timeout=10)
        check(status.step == 23 and parameters("crash")[1].keys() == before.keys() and
              same_bits(parameters("crash")[1], before),
              f"restarted: step {status.step}, the same parameters")
        check(optimizer.stop(signal.SIGTERM) == 0, "the optimizer exits 0 on SIGTERM")
        for i, replica in enumerate(replicas):
            check(replica.stop(signal.SIGTERM) == 0, f"replica {i} exits 0 on SIGTERM")

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
