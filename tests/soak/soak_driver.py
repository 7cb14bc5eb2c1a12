#!/usr/bin/python3
"""Soak driver: many concurrent clients with a mix of calls against one running gradserve.

    soak_driver.py --target HOST:PORT --server-pid PID --proto PATH [--duration S] ...

Each client thread loops over a weighted mix of call kinds until the time is up; every kind has
exactly one expected status:

  kind               what                                                    expected
  unary_ok           ComputeGradients, one of a few valid requests            OK, bit-identical
                                                                              to the first answer
  check_ok           CheckGradients on a small model                          OK, bit-identical
  invalid            ComputeGradients with a weight of the wrong shape        INVALID_ARGUMENT
  over_limit         batch over the server's --max-batch                      RESOURCE_EXHAUSTED
  over_message       a request over --max-message-bytes (gRPC refuses it)     RESOURCE_EXHAUSTED
  cancelled          a long ComputeGradients, cancelled by the client         CANCELLED
  deadline           the same long call with a short deadline                 DEADLINE_EXCEEDED
  stream_ok          StreamGradients: parameters, SGD updates, a micro-batch  OK, every answer
                     accumulation; step 0 must equal the unary answer          bit-identical
  stream_invalid     a step without parameters on a new stream                INVALID_ARGUMENT
  stream_cancelled   one step answered, then the client cancels               CANCELLED
  stream_deadline    setup, then idle past the stream's deadline              DEADLINE_EXCEEDED

Reports calls made, statuses per kind, client-side p50/p99 latency per kind, and the server's
VmRSS (from /proc/PID/status) at start, after warm-up, at the end and its peak; the server's
own GetStats counts by method and code. Passes (exit 0) when no call got an unexpected status,
every valid answer matched its reference, the server stayed up, and RSS grew less than
--max-rss-growth percent from the end of warm-up to the end.
"""

import argparse
import importlib
import json
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import numpy as np


def generate_stubs(proto: Path, out_dir: Path):
    src = out_dir / "proto"
    src.mkdir()
    shutil.copy(proto, src / proto.name)
    subprocess.run(["protoc", f"-I{src}", f"--python_out={out_dir}",
                    "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                    f"--grpc_python_out={out_dir}", str(src / proto.name)], check=True)
    sys.path.insert(0, str(out_dir))
    return (importlib.import_module(f"{proto.stem}_pb2"),
            importlib.import_module(f"{proto.stem}_pb2_grpc"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Requests:
    """Every request the soak sends, built once (deterministic seeds)."""

    def __init__(self, pb, max_batch: int, max_message_bytes: int):
        self.pb = pb
        rng = np.random.default_rng(7)
        self.valid = {
            "demo_f64": self.mlp([4, 2], "relu", 8, np.float64, rng, "mse"),
            "mlp_f32": self.mlp([32, 64, 64, 10], "tanh", 32, np.float32, rng, "cross_entropy"),
            "mlp_f64_dx": self.mlp([16, 32, 8], "gelu", 16, np.float64, rng, "mse", dx=True),
            "sqrt_ckpt_f32": self.mlp([24] * 9, "relu", 16, np.float32, rng, "mse",
                                      checkpoint=pb.Checkpointing.MODE_SQRT),
        }
        check = pb.CheckGradientsRequest(samples_per_tensor=8, seed=3)
        check.request.CopyFrom(self.mlp([6, 5, 3], "tanh", 4, np.float64, rng, "mse"))
        self.check = check
        invalid = pb.ComputeGradientsRequest()
        invalid.CopyFrom(self.valid["mlp_f32"])
        invalid.parameters[1].weight.shape[:] = [64, 63]  # Expected [64, 64].
        self.invalid = invalid
        self.over_limit = self.mlp([2, 2], "relu", max_batch + 1, np.float32, rng, "mse")
        # One float32 tensor a little over the message limit, as inputs of a 1-wide Linear.
        rows = max_message_bytes // 4 + 1024
        self.over_message = self.mlp([1, 1], "relu", rows, np.float32, rng, "mse")
        # Long enough (~0.1-1 s) that cancelling after a few ms or a 20 ms deadline always
        # lands while it waits or computes.
        self.slow = self.mlp([128] * 49, "relu", 1024, np.float32, rng, "mse")
        self._streams = {}
        for name in self.valid:
            self.stream_messages(name)

    def tensor(self, a: np.ndarray):
        pb = self.pb
        if a.dtype == np.float32:
            dtype, data = pb.DTYPE_FLOAT32, a.astype("<f4").tobytes()
        elif a.dtype == np.float64:
            dtype, data = pb.DTYPE_FLOAT64, a.astype("<f8").tobytes()
        else:
            dtype, data = pb.DTYPE_INT64, a.astype("<i8").tobytes()
        return pb.Tensor(dtype=dtype, shape=list(a.shape), data=data)

    def mlp(self, widths, activation, batch, dtype, rng, loss, dx=False, checkpoint=None):
        pb = self.pb
        request = pb.ComputeGradientsRequest()
        for i in range(len(widths) - 1):
            layer = request.model.layers.add()
            layer.linear.in_features = widths[i]
            layer.linear.out_features = widths[i + 1]
            w = rng.standard_normal((widths[i + 1], widths[i])) / np.sqrt(widths[i])
            b = rng.standard_normal(widths[i + 1]) * 0.1
            p = request.parameters.add()
            p.weight.CopyFrom(self.tensor(w.astype(dtype)))
            p.bias.CopyFrom(self.tensor(b.astype(dtype)))
            if i < len(widths) - 2 or len(widths) == 2:
                getattr(request.model.layers.add(), activation).SetInParent()
        request.inputs.CopyFrom(self.tensor(rng.standard_normal((batch, widths[0])).astype(dtype)))
        if loss == "cross_entropy":
            request.model.loss.cross_entropy.SetInParent()
            request.targets.CopyFrom(self.tensor(rng.integers(0, widths[-1], batch)))
        else:
            request.model.loss.mse.SetInParent()
            request.targets.CopyFrom(
                self.tensor(rng.standard_normal((batch, widths[-1])).astype(dtype)))
        request.options.return_input_gradient = dx
        if checkpoint is not None:
            request.options.checkpointing.mode = checkpoint
        return request

    def stream_messages(self, name):
        if name not in self._streams:
            self._streams[name] = self.build_stream(self.valid[name])
        return self._streams[name]

    def build_stream(self, base):
        """Setup, full parameters, two SGD updates, a two-micro-batch accumulation."""
        pb = self.pb
        msgs = [pb.StreamGradientsRequest(setup=pb.StreamSetup(
            model=base.model, dtype=base.inputs.dtype, options=base.options))]
        msgs.append(pb.StreamGradientsRequest(step=pb.StreamStep(
            parameters=base.parameters, inputs=base.inputs, targets=base.targets)))
        np_dtype = "<f4" if base.inputs.dtype == pb.DTYPE_FLOAT32 else "<f8"
        update = []
        for p in base.parameters:
            u = pb.LinearParameters()
            for name in ("weight", "bias"):
                t = getattr(p, name)
                delta = (-0.01 * np.frombuffer(t.data, dtype=np_dtype)).astype(np_dtype)
                getattr(u, name).CopyFrom(
                    pb.Tensor(dtype=t.dtype, shape=t.shape, data=delta.tobytes()))
            update.append(u)
        for _ in range(2):
            msgs.append(pb.StreamGradientsRequest(step=pb.StreamStep(
                parameter_update=update, inputs=base.inputs, targets=base.targets)))
        msgs.append(pb.StreamGradientsRequest(step=pb.StreamStep(
            inputs=base.inputs, targets=base.targets, accumulate=True)))
        msgs.append(pb.StreamGradientsRequest(step=pb.StreamStep(
            inputs=base.inputs, targets=base.targets)))
        return msgs  # Four answers: steps 0, 1, 2 and 4 (3 accumulates).


def deterministic(pb, response) -> bytes:
    """The answer without its wall times."""
    r = type(response)()
    r.CopyFrom(response)
    if r.DESCRIPTOR.name == "StreamGradientsResponse":
        stats = r.result.stats
    elif r.DESCRIPTOR.name == "ComputeGradientsResponse":
        stats = r.stats
    else:
        return r.SerializeToString(deterministic=True)
    stats.ClearField("forward_micros")
    stats.ClearField("backward_micros")
    return r.SerializeToString(deterministic=True)


def demo_closed_form(pb, request, response) -> float:
    """Relative error of the demo network's answer against numpy (Linear -> ReLU -> MSE)."""
    f = lambda t: np.frombuffer(t.data, dtype="<f8").reshape(tuple(t.shape))
    x, w, b, t = (f(request.inputs), f(request.parameters[0].weight),
                  f(request.parameters[0].bias), f(request.targets))
    z = x @ w.T + b
    a = np.maximum(z, 0)
    delta = 2.0 / a.size * (a - t) * (z > 0)
    errors = [abs(response.loss - np.mean((a - t) ** 2)) / abs(np.mean((a - t) ** 2))]
    for got, want in ((f(response.gradients[0].weight), delta.T @ x),
                      (f(response.gradients[0].bias), delta.sum(axis=0))):
        errors.append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    return max(errors)


class Soak:
    KINDS = {  # kind: (weight, expected status)
        "unary_ok": (30, grpc.StatusCode.OK),
        "check_ok": (5, grpc.StatusCode.OK),
        "invalid": (10, grpc.StatusCode.INVALID_ARGUMENT),
        "over_limit": (5, grpc.StatusCode.RESOURCE_EXHAUSTED),
        "over_message": (1, grpc.StatusCode.RESOURCE_EXHAUSTED),
        "cancelled": (4, grpc.StatusCode.CANCELLED),
        "deadline": (4, grpc.StatusCode.DEADLINE_EXCEEDED),
        "stream_ok": (12, grpc.StatusCode.OK),
        "stream_invalid": (4, grpc.StatusCode.INVALID_ARGUMENT),
        "stream_cancelled": (3, grpc.StatusCode.CANCELLED),
        "stream_deadline": (2, grpc.StatusCode.DEADLINE_EXCEEDED),
    }

    def __init__(self, args, pb, pb_grpc):
        self.args, self.pb = args, pb
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        # A few channels (connections), shared by the client threads round-robin.
        self.channels = [grpc.insecure_channel(args.target, options=options)
                         for _ in range(args.channels)]
        self.stubs = [pb_grpc.GradientServiceStub(c) for c in self.channels]
        self.requests = Requests(pb, args.max_batch, args.max_message_bytes)
        self.stream_bases = ["mlp_f32", "mlp_f64_dx"]
        self.lock = threading.Lock()
        self.references = {}  # key -> deterministic bytes of the first answer.
        self.statuses = defaultdict(Counter)  # kind -> status name -> count
        self.latencies = defaultdict(list)  # kind -> seconds (every call, whatever its status)
        self.unexpected = []  # (kind, status, details), the first few
        self.mismatches = []
        self.calls = 0
        self.stop_at = 0.0

    # -- bookkeeping -------------------------------------------------------------------------
    def record(self, kind, code, seconds, details=""):
        expected = self.KINDS[kind][1]
        with self.lock:
            self.calls += 1
            self.statuses[kind][code.name] += 1
            self.latencies[kind].append(seconds)
            if code != expected and len(self.unexpected) < 20:
                self.unexpected.append((kind, code.name, details[:300]))

    def verify(self, key, response):
        got = deterministic(self.pb, response)
        with self.lock:
            want = self.references.setdefault(key, got)
        if got != want:
            with self.lock:
                self.mismatches.append(key)
            return False
        return True

    # -- call kinds --------------------------------------------------------------------------
    def unary(self, stub, kind, method, request, timeout=30.0, key=None):
        start = time.monotonic()
        try:
            response = getattr(stub, method)(request, timeout=timeout)
            code, details = grpc.StatusCode.OK, ""
            if key is not None:
                self.verify(key, response)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        self.record(kind, code, time.monotonic() - start, details)

    def cancelled(self, stub, rng):
        start = time.monotonic()
        future = stub.ComputeGradients.future(self.requests.slow, timeout=30.0)
        time.sleep(rng.uniform(0.002, 0.02))
        future.cancel()
        try:
            future.result()
            code, details = grpc.StatusCode.OK, ""
        except grpc.FutureCancelledError:
            code, details = grpc.StatusCode.CANCELLED, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        self.record("cancelled", code, time.monotonic() - start, details)

    def stream(self, stub, kind, messages, timeout, answers_before_cancel=None, idle=False):
        """Runs one stream; verifies answers for stream_ok. Returns nothing: records."""
        start = time.monotonic()
        outbox = queue.Queue()
        if not idle and answers_before_cancel is None:
            for m in messages:
                outbox.put(m)
            outbox.put(None)  # Half-close.
        else:
            for m in messages:
                outbox.put(m)

        def requests():
            while True:
                m = outbox.get()
                if m is None:
                    return
                yield m

        call = stub.StreamGradients(requests(), timeout=timeout)
        answers = 0
        code, details = grpc.StatusCode.OK, ""
        try:
            for response in call:
                if kind == "stream_ok":
                    base = messages[0].setup  # Identify the stream by its model.
                    key = ("stream", base.SerializeToString(deterministic=True), answers)
                    ok = self.verify(key, response)
                    if ok and answers == 0:
                        # Step 0 is the unary call with the same parameters and batch.
                        self.verify(("unary", self.stream_key(messages)), response.result)
                answers += 1
                if answers_before_cancel is not None and answers >= answers_before_cancel:
                    call.cancel()
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        finally:
            outbox.put(None)  # Lets the request iterator finish if it is still waiting.
        if kind == "stream_ok" and code == grpc.StatusCode.OK and answers != 4:
            code, details = grpc.StatusCode.UNKNOWN, f"{answers} answers, expected 4"
        self.record(kind, code, time.monotonic() - start, details)

    def stream_key(self, messages):
        for name, request in self.requests.valid.items():
            if request.model == messages[0].setup.model:
                return name
        raise AssertionError("stream of an unknown model")

    # -- the loop ----------------------------------------------------------------------------
    def client(self, index):
        rng = random.Random(1000 + index)
        stub = self.stubs[index % len(self.stubs)]
        kinds = list(self.KINDS)
        weights = [self.KINDS[k][0] for k in kinds]
        req = self.requests
        while time.monotonic() < self.stop_at:
            kind = rng.choices(kinds, weights)[0]
            if kind == "unary_ok":
                name = rng.choice(list(req.valid))
                self.unary(stub, kind, "ComputeGradients", req.valid[name], key=("unary", name))
            elif kind == "check_ok":
                self.unary(stub, kind, "CheckGradients", req.check, key=("check",))
            elif kind == "invalid":
                self.unary(stub, kind, "ComputeGradients", req.invalid)
            elif kind == "over_limit":
                self.unary(stub, kind, "ComputeGradients", req.over_limit)
            elif kind == "over_message":
                self.unary(stub, kind, "ComputeGradients", req.over_message)
            elif kind == "cancelled":
                self.cancelled(stub, rng)
            elif kind == "deadline":
                self.unary(stub, kind, "ComputeGradients", req.slow, timeout=0.02)
            elif kind == "stream_ok":
                self.stream(stub, kind, req.stream_messages(rng.choice(self.stream_bases)),
                            timeout=30.0)
            elif kind == "stream_invalid":
                msgs = req.stream_messages("mlp_f32")
                self.stream(stub, kind, [msgs[0], msgs[2]], timeout=30.0)
            elif kind == "stream_cancelled":
                msgs = req.stream_messages("mlp_f32")
                self.stream(stub, kind, msgs[:2], timeout=30.0, answers_before_cancel=1)
            elif kind == "stream_deadline":
                msgs = req.stream_messages("demo_f64")
                self.stream(stub, kind, msgs[:1], timeout=0.2, idle=True)

    def run(self):
        args, pb = self.args, self.pb
        report = {"rss_kib": {}}
        stub = self.stubs[0]
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.limits.max_batch == args.max_batch, "--max-batch differs from the server's"
        assert info.limits.max_message_bytes == args.max_message_bytes, "--max-message-bytes"
        # References computed once, serially, before the load: the first answers.
        demo = self.requests.valid["demo_f64"]
        for name, request in self.requests.valid.items():
            self.verify(("unary", name), stub.ComputeGradients(request, timeout=30))
        demo_error = demo_closed_form(pb, demo, stub.ComputeGradients(demo, timeout=30))
        report["demo_closed_form_rel_error"] = demo_error
        report["rss_kib"]["start"] = rss_kib(args.server_pid)
        peak = report["rss_kib"]["start"]
        started = time.monotonic()
        self.stop_at = started + args.duration
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        warm_done = False
        samples = []
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            now = time.monotonic() - started
            try:
                rss = rss_kib(args.server_pid)
            except (OSError, RuntimeError):
                report["server_died"] = True
                break
            peak = max(peak, rss)
            samples.append((round(now, 1), rss))
            if not warm_done and now >= args.warmup:
                report["rss_kib"]["after_warmup"] = rss
                warm_done = True
            if not args.quiet and int(now) % 15 == 0:
                with self.lock:
                    print(f"  t={now:5.0f}s calls={self.calls} rss={rss / 1024:.1f} MiB",
                          flush=True)
        for t in threads:
            t.join(timeout=60)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # Let the server release what the last calls held.
        report["rss_kib"]["end"] = rss_kib(args.server_pid)
        report["rss_kib"]["peak"] = max(peak, report["rss_kib"]["end"])
        report["rss_kib"].setdefault("after_warmup", report["rss_kib"]["end"])
        report["rss_samples"] = samples
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        report["server_stats"] = {
            m.method: {c.code: c.calls for c in m.by_code} for m in stats.methods}
        report["server_in_flight_at_end"] = stats.calls_in_flight
        report["server_open_streams_at_end"] = stats.open_streams
        report.update(self.summary(elapsed))
        return report

    def summary(self, elapsed):
        out = {"elapsed_s": round(elapsed, 1), "calls": self.calls,
               "calls_per_s": round(self.calls / elapsed, 1), "kinds": {}}
        for kind, (_, expected) in self.KINDS.items():
            lat = np.array(self.latencies[kind]) * 1000
            out["kinds"][kind] = {
                "expected": expected.name,
                "calls": int(lat.size),
                "statuses": dict(self.statuses[kind]),
                "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            }
        out["unexpected"] = self.unexpected
        out["unexpected_count"] = sum(
            n for kind, (_, expected) in self.KINDS.items()
            for code, n in self.statuses[kind].items() if code != expected.name)
        out["mismatches"] = len(self.mismatches)
        out["mismatched_keys"] = sorted({str(k)[:80] for k in self.mismatches})[:10]
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--proto", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=180)
    parser.add_argument("--warmup", type=float, default=30)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--max-batch", type=int, required=True, help="the server's --max-batch")
    parser.add_argument("--max-message-bytes", type=int, required=True,
                        help="the server's --max-message-bytes")
    parser.add_argument("--max-rss-growth", type=float, default=10.0,
                        help="percent, after warm-up to the end; negative: not checked")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pb, pb_grpc = generate_stubs(args.proto, Path(tmp))
        soak = Soak(args, pb, pb_grpc)
        report = soak.run()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))

    rss = report["rss_kib"]
    growth = 100.0 * (rss["end"] - rss["after_warmup"]) / rss["after_warmup"]
    report["rss_growth_pct"] = growth
    print(f"soak: {report['calls']} calls in {report['elapsed_s']} s "
          f"({report['calls_per_s']}/s), {args.clients} clients on {args.channels} channels")
    print(f"  {'kind':<17} {'calls':>6} {'p50 ms':>9} {'p99 ms':>9}  statuses (expected)")
    for kind, k in report["kinds"].items():
        statuses = ", ".join(f"{c} {n}" for c, n in sorted(k["statuses"].items()))
        p50 = "-" if k["p50_ms"] is None else f"{k['p50_ms']:.1f}"
        p99 = "-" if k["p99_ms"] is None else f"{k['p99_ms']:.1f}"
        print(f"  {kind:<17} {k['calls']:>6} {p50:>9} {p99:>9}  {statuses} ({k['expected']})")
    print(f"  server GetStats by method and code: {report['server_stats']}")
    print(f"  server RSS: start {rss['start'] / 1024:.1f} MiB, after warm-up "
          f"{rss['after_warmup'] / 1024:.1f} MiB, end {rss['end'] / 1024:.1f} MiB, peak "
          f"{rss['peak'] / 1024:.1f} MiB; growth after warm-up {growth:+.2f}%")
    print(f"  demo network vs numpy closed form: max rel error "
          f"{report['demo_closed_form_rel_error']:.2e}")
    failures = []
    if report["unexpected_count"]:
        failures.append(f"{report['unexpected_count']} unexpected statuses, first: "
                        f"{report['unexpected'][:3]}")
    if report["mismatches"]:
        failures.append(f"{report['mismatches']} answers differ from their reference: "
                        f"{report['mismatched_keys']}")
    if report.get("server_died"):
        failures.append("the server died")
    if report["demo_closed_form_rel_error"] > 1e-12:
        failures.append("the demo answer disagrees with numpy")
    if any(k["calls"] == 0 for k in report["kinds"].values()):
        failures.append("some call kind never ran: "
                        f"{[n for n, k in report['kinds'].items() if k['calls'] == 0]}")
    if args.max_rss_growth >= 0 and growth >= args.max_rss_growth:
        failures.append(f"RSS grew {growth:.1f}% after warm-up (limit {args.max_rss_growth}%)")
    if report["server_in_flight_at_end"] or report["server_open_streams_at_end"]:
        failures.append("calls or streams still open on the server after the clients stopped")
    for f in failures:
        print(f"FAIL: {f}")
    print("soak: PASS" if not failures else "soak: FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
