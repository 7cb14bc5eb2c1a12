#!/usr/bin/python3
"""Drives sigterm_in_flight.sh: SIGTERM to a real gradserve with long calls in flight.

    sigterm_in_flight.py --target 127.0.0.1:PORT --server-pid PID --drain-delay D
                         --shutdown-grace G --stubs DIR --client-dir client/python

The server runs with --threads 1, so the calls run one after another: one computes while the
others wait in the queue, and the last one ends several seconds after SIGTERM. The script
  1. sizes the batch with timed calls so that one call computes for about --call-seconds (on
     a slower build or machine too), keeps the last response as the reference, and sizes the
     number of calls so that the work still to do after SIGTERM lasts well past the drain
     delay;
  2. starts the calls and waits until GetStats reports all of them in flight;
  3. sends SIGTERM itself (it alone knows when the calls are in flight);
  4. checks health turns NOT_SERVING while other calls are still answered (the drain delay);
  5. checks that once the drain delay is over, a new call is refused (UNAVAILABLE) while the
     server is still working on the calls in flight;
  6. checks every call in flight ends OK with a response bit-identical to the reference (the
     server promises bit-identical results run to run).
The shell script then checks the server exits 0. Exits non-zero on any failed check.
"""

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

SERVICE = "gradserve.v1.GradientService"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--server-pid", required=True, type=int)
    parser.add_argument("--drain-delay", required=True, type=float)
    parser.add_argument("--shutdown-grace", required=True, type=float)
    parser.add_argument("--stubs", required=True, type=Path)
    parser.add_argument("--client-dir", required=True, type=Path)
    # One call: `layers` hidden Linear(width -> width) + Tanh, 6*batch*width^2 flops each, in
    # float32, between a narrow input and output layer; the batch is chosen to take about
    # --call-seconds.
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--call-seconds", type=float, default=2.0)
    args = parser.parse_args()

    # Stubs first, so that "gradserve.v1" is the freshly generated package, then the library.
    sys.path[:0] = [str(args.stubs.resolve()), str(args.client_dir.resolve())]
    import grpc
    import numpy as np

    from gradserve import client as gc

    drain, grace = args.drain_delay, args.shutdown_grace
    failures = []

    def check(ok: bool, what: str) -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)
        return ok

    def fail(what: str) -> int:
        check(False, what)
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1

    def code_of(thunk):
        """(status code, result or details) of one call."""
        try:
            return grpc.StatusCode.OK, thunk()
        except grpc.RpcError as error:
            return error.code(), error.details()

    def outcome(code, result) -> str:
        """What a call got, for messages: "OK" or "CODE: details"."""
        return "OK" if code == grpc.StatusCode.OK else f"{code.name}: {result}"

    # Inputs and targets only 16 wide: the batch then adds compute but hardly any bytes, so
    # sending a call costs about the same whatever batch the sizing below picks (the 8 MiB of
    # parameters), and all the calls are in flight long before the first is done.
    io_width = 16

    def make_request(batch: int):
        rng = np.random.default_rng(5)
        request = gc.pb.ComputeGradientsRequest()
        widths = [io_width] + [args.width] * (args.layers + 1) + [io_width]
        for fan_in, fan_out in zip(widths, widths[1:]):
            request.model.layers.add().linear.CopyFrom(
                gc.pb.Linear(in_features=fan_in, out_features=fan_out))
            if fan_out != io_width:
                request.model.layers.add().tanh.SetInParent()
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's init: tanh stays out of saturation.
            request.parameters.add(
                weight=gc.to_tensor(rng.uniform(-bound, bound, (fan_out, fan_in)), np.float32),
                bias=gc.to_tensor(rng.uniform(-bound, bound, fan_out), np.float32))
        request.model.loss.CopyFrom(gc.loss("mse"))
        request.inputs.CopyFrom(gc.to_tensor(rng.standard_normal((batch, io_width)), np.float32))
        request.targets.CopyFrom(
            gc.to_tensor(rng.uniform(-0.5, 0.5, (batch, io_width)), np.float32))
        return request

    # A deadline no well-behaved run reaches: the server must finish these calls, not time out.
    call_timeout = drain + grace + 60

    def comparable(response) -> bytes:
        """The response without its timings, which are the only part allowed to differ."""
        copy = gc.pb.ComputeGradientsResponse()
        copy.CopyFrom(response)
        copy.ClearField("stats")
        return copy.SerializeToString(deterministic=True)

    control = gc.connect(args.target)  # GetStats, health, GetServerInfo during the drain.
    work = gc.connect(args.target)     # The long calls.
    service, work_service = gc.stub(control), gc.stub(work)

    def compute_seconds(response) -> float:
        """The server's forward + backward time: what makes queued calls wait for the core.
        Not the client's wall time, which adds the transfer of parameters and gradients."""
        return (response.stats.forward_micros + response.stats.backward_micros) / 1e6

    # The compute is about linear in the batch: start small and rescale the batch until a call
    # computes for --call-seconds within a factor 1.5 (small batches run less efficiently, and
    # the machine's load varies). The last call is the reference.
    batch = 256
    for _ in range(4):
        request = make_request(batch)
        code, reference = code_of(
            lambda: work_service.ComputeGradients(request, timeout=call_timeout))
        if not check(code == grpc.StatusCode.OK,
                     f"batch {batch}: OK (got {outcome(code, reference)})"):
            return fail("no reference")
        seconds = compute_seconds(reference)
        print(f"  batch {batch} computes for {seconds:.2f} s")
        if args.call_seconds / 1.5 <= seconds <= args.call_seconds * 1.5:
            break
        # 16384 rows: 32 MiB per activation, and over 5 s a call on the development machines.
        batch = min(16384, max(8, round(batch * args.call_seconds / max(seconds, 1e-3))))
    if seconds < args.call_seconds / 1.5:
        return fail(f"no batch up to {batch} computes for {args.call_seconds / 1.5:.2f} s")
    want = comparable(reference)
    # Calls run one at a time, so after SIGTERM at least (n - 1) * seconds of work remain, as
    # the first one may be nearly done. That must outlast the drain delay, so the refusal below
    # is seen while calls still run, even if the calls run twice as fast as the reference did
    # (it may have shared its core with another test that has since ended): with this margin,
    # over 2 s of work are left at the end of the drain then.
    margin = drain + 4.0
    n = max(3, math.ceil((drain + margin) / seconds) + 1)
    print(f"  {n} calls: {n * seconds:.1f} s of work")
    # And the work left after the drain must fit the grace, even if the calls run twice as slow.
    if 2 * n * seconds - drain > grace:
        return fail(f"a call takes {seconds:.2f} s: {n} calls do not fit --drain-delay {drain} "
                    f"and --shutdown-grace {grace}")

    print(f"{n} calls in flight")
    futures = [work_service.ComputeGradients.future(request, timeout=call_timeout)
               for _ in range(n)]
    # calls_in_flight counts calls received in full (waiting for the core or computing).
    deadline = time.monotonic() + 60
    while True:
        code, stats = code_of(lambda: service.GetStats(gc.pb.GetStatsRequest(), timeout=10))
        if code != grpc.StatusCode.OK:
            return fail(f"GetStats: {code.name}: {stats}")
        if stats.calls_in_flight == n:
            break
        if any(f.done() for f in futures) or time.monotonic() > deadline:
            return fail(f"the {n} calls never were all in flight at once "
                        f"(calls_in_flight {stats.calls_in_flight}, "
                        f"{sum(f.done() for f in futures)} done)")
        time.sleep(0.02)  # Polling interval only; the condition above is what is waited for.
    check(stats.queue_length == n - 1,
          f"GetStats: {n} in flight, {stats.queue_length} of them queued (expected {n - 1})")

    print("SIGTERM")
    # Timed before the kill: the server's drain delay then starts no earlier than `sigterm`, so
    # the refusal below can never seem to come before it (both use the system's monotonic clock).
    sigterm = time.monotonic()
    os.kill(args.server_pid, signal.SIGTERM)

    # Health turns NOT_SERVING at once; the drain delay keeps the server answering calls.
    status = None
    while time.monotonic() - sigterm < drain:
        code, status = code_of(lambda: gc.health(control, "", timeout=drain))
        if status == "NOT_SERVING":
            break
        time.sleep(0.01)  # Polling interval only.
    seen = time.monotonic() - sigterm
    check(status == "NOT_SERVING",
          f"health \"\" NOT_SERVING {seen:.3f} s after SIGTERM (drain delay {drain} s; "
          f"got {status})")
    code, status = code_of(lambda: gc.health(control, SERVICE, timeout=drain))
    check(status == "NOT_SERVING", f"health {SERVICE} NOT_SERVING (got {status})")
    code, info = code_of(lambda: service.GetServerInfo(gc.pb.GetServerInfoRequest(), timeout=drain))
    check(code == grpc.StatusCode.OK,
          f"GetServerInfo answered while draining, {time.monotonic() - sigterm:.3f} s after "
          f"SIGTERM: OK (got {outcome(code, info)})")

    # The end of the drain delay is when the server stops accepting calls: a new one is then
    # refused with UNAVAILABLE (the server's own refusal while the calls in flight finish, or
    # a refused connection once gRPC has shut down). Each attempt uses a new channel.
    refused_at = None
    while time.monotonic() - sigterm < drain + 10:
        with gc.connect(args.target) as probe:
            code, status = code_of(lambda: gc.stub(probe).GetServerInfo(
                gc.pb.GetServerInfoRequest(), timeout=2))
        if code == grpc.StatusCode.UNAVAILABLE:
            refused_at = time.monotonic() - sigterm
            break
        time.sleep(0.02)  # Polling interval only.
    if refused_at is None:
        return fail(f"new calls still accepted {drain + 10:.0f} s after SIGTERM "
                    f"(last: {code.name})")
    with gc.connect(args.target) as late:
        code, details = code_of(
            lambda: gc.stub(late).ComputeGradients(request, timeout=call_timeout))
    pending = sum(not f.done() for f in futures)
    server_alive = True
    try:
        os.kill(args.server_pid, 0)
    except ProcessLookupError:
        server_alive = False
    check(refused_at >= drain,
          f"new calls refused from {refused_at:.3f} s after SIGTERM, not before the "
          f"drain delay ({drain} s)")
    check(code == grpc.StatusCode.UNAVAILABLE,
          f"a new ComputeGradients after the drain delay: UNAVAILABLE "
          f"(got {outcome(code, details)})")
    check(server_alive and pending > 0,
          f"...while the server still ran the calls in flight ({pending} of {n} unfinished)")

    print("the calls in flight")
    for index, future in enumerate(futures):
        code, response = code_of(future.result)
        if code != grpc.StatusCode.OK:
            check(False, f"call {index}: OK (got {outcome(code, response)})")
        else:
            check(comparable(response) == want, f"call {index}: OK, bit-identical to the reference")
    finished = time.monotonic() - sigterm
    print(f"  the last call ended {finished:.2f} s after SIGTERM")
    control.close()
    work.close()

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("PASS: drained, refused new calls, finished every call in flight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
