#!/usr/bin/python3
"""Driver of bench/abuse.sh: the security issue's attacks against a live gradserve.

    abuse.py run --server BIN --out DIR [--quick] [--attack-seconds S] [--rss-budget-mib M]
                 [--only a,b] [--pidfile F] [-- SERVER_FLAGS...]
    abuse.py rolling --server BIN --out DIR [--restarts N] [--pidfile F] [-- SERVER_FLAGS...]

Internal modes (run as child processes, so that the attacker's Python, its GIL and its
serialisation of huge messages never slow the innocent client down):
    abuse.py innocent ...        small ComputeGradients at ~20 calls/s, open loop, one JSON line
                                 per call (and GET /metrics scrapes with --scrape URL)
    abuse.py attack NAME ...     one attack for --seconds, then its status counts as JSON

Every row gets a fresh server (a free loopback port), so one attack's leftovers never count in
the next row. Every loop is bounded by a time limit and stops by itself; child processes and
servers are killed on exit (the shell wrapper also kills every server pid in --pidfile).
Expects the stubs on sys.path (abuse.sh generates them with client/python/generate.sh).
"""

import argparse
import atexit
import collections
import datetime
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, "client", "python"))  # after the stubs on PYTHONPATH

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from gradserve import client as gc  # noqa: E402

pb, pb_grpc = gc.pb, gc.pb_grpc
SERVICE = "/gradserve.v1.GradientService/"
INNOCENT_DEADLINE = 2.0  # s; a failed innocent call counts as this latency
INNOCENT_RATE = 20.0  # calls/s
MIB = 1 << 20


# --- requests ------------------------------------------------------------------------------------

def linear_layer(request, fan_in, fan_out, bias=True):
    layer = request.model.layers.add()
    layer.linear.in_features = fan_in
    layer.linear.out_features = fan_out
    if not bias:
        layer.linear.bias = False


def mlp_request(widths, batch, dtype, rng, activation="relu", loss="mse"):
    """Linear layers of `widths` with `activation` between, random parameters and batch."""
    request = pb.ComputeGradientsRequest()
    for i in range(len(widths) - 1):
        linear_layer(request, widths[i], widths[i + 1])
        w = rng.standard_normal((widths[i + 1], widths[i])) / math.sqrt(widths[i])
        p = request.parameters.add()
        p.weight.CopyFrom(gc.to_tensor(w, dtype))
        p.bias.CopyFrom(gc.to_tensor(rng.standard_normal(widths[i + 1]) * 0.1, dtype))
        if i < len(widths) - 2:
            getattr(request.model.layers.add(), activation).SetInParent()
    request.model.loss.CopyFrom(gc.loss(loss))
    request.inputs.CopyFrom(gc.to_tensor(rng.standard_normal((batch, widths[0])), dtype))
    if loss == "cross_entropy":
        request.targets.CopyFrom(gc.to_tensor(rng.integers(0, widths[-1], batch, dtype=np.int64)))
    else:
        request.targets.CopyFrom(gc.to_tensor(rng.standard_normal((batch, widths[-1])), dtype))
    return request


def innocent_request():
    """Linear(16,16)-ReLU-Linear(16,4), MSE, batch 8, float32."""
    return mlp_request([16, 16, 4], 8, np.float32, np.random.default_rng(1))


def planner_request():
    """Attack 1: ~12 KB, 1024 Linear layers whose widths cycle through 2^20 >> k (k = 0..20),
    chained from w(0) = 1, one *empty* parameters entry per layer, inputs [1, 1], MSE, a memory
    budget of 1 byte."""
    def width(i):
        return (1 << 20) >> ((i + 20) % 21)  # w(0) = 1, w(1) = 2^20, w(2) = 2^19, ...
    request = pb.ComputeGradientsRequest()
    layers = 1024
    for i in range(layers):
        linear_layer(request, width(i), width(i + 1))
        request.parameters.add()  # parameters {}: no weight, no bias
    request.model.loss.mse.SetInParent()
    request.inputs.CopyFrom(gc.to_tensor(np.ones((1, 1), np.float32)))
    request.targets.CopyFrom(gc.to_tensor(np.zeros((1, width(layers)), np.float32)))
    request.options.checkpointing.CopyFrom(gc.checkpointing("memory_budget", memory_budget_bytes=1))
    return request


def heavy_check_request():
    """Attack 2: CheckGradients, 4096 samples per tensor, 96 x Linear(32,32) + tanh, batch 16,
    float64."""
    inner = mlp_request([32] * 97, 16, np.float64, np.random.default_rng(2), activation="tanh")
    return pb.CheckGradientsRequest(request=inner, samples_per_tensor=4096, seed=1)


def flood_request(mib=200):
    """Attack 3: a ~200 MiB ComputeGradients: Linear(1,1) with inputs [rows, 1] float32 (the
    targets stay [1, 1]: the request is invalid, but a server without the token must refuse it
    before it looks at anything)."""
    rows = mib * MIB // 4
    request = mlp_request([1, 1], 1, np.float32, np.random.default_rng(3))
    request.inputs.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[rows, 1],
                                      data=np.ones(rows, "<f4").tobytes()))
    return request


def slow_reader_request():
    """Attack 4: Linear(1 -> 4000, no bias), cross-entropy, inputs [15000, 1] float32, int64
    targets, return_output: a ~240 MB answer (the output alone) to a ~196 KB request."""
    rng = np.random.default_rng(4)
    request = pb.ComputeGradientsRequest()
    linear_layer(request, 1, 4000, bias=False)
    request.parameters.add().weight.CopyFrom(
        gc.to_tensor(rng.standard_normal((4000, 1)), np.float32))
    request.model.loss.cross_entropy.SetInParent()
    request.inputs.CopyFrom(gc.to_tensor(rng.standard_normal((15000, 1)), np.float32))
    request.targets.CopyFrom(gc.to_tensor(rng.integers(0, 4000, 15000, dtype=np.int64)))
    request.options.return_output = True
    return request


def hog_request():
    """Attack 7: a medium call, ~0.2 s with both cores of the 2-core bench machine: batch 1024,
    4 x Linear(640,640) + ReLU, float32 (10 GFLOP, a ~12 MB request)."""
    return mlp_request([640] * 5, 1024, np.float32, np.random.default_rng(5))


# --- small helpers -------------------------------------------------------------------------------

def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def proc_status(pid):
    """(VmRSS, VmHWM) in KiB, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def raw_method(channel, name):
    """A unary method that sends pre-serialised bytes and returns raw bytes (no re-encoding of
    a 200 MiB message per call)."""
    return channel.unary_unary(SERVICE + name)


def token_metadata(token):
    return [("authorization", f"Bearer {token}")] if token else None


_children = []


def _kill_children():
    for child in _children:
        if child.poll() is None:
            try:
                child.kill()
                child.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# --- the innocent client (child process) ---------------------------------------------------------

def innocent_main(args):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = open(args.log, "w", buffering=1)
    lock = threading.Lock()
    channel = gc.connect(args.target, token=args.token or None, token_env=None)
    call = raw_method(channel, "ComputeGradients")
    request = innocent_request().SerializeToString()
    deadline = time.monotonic() + args.max_seconds

    def write(record):
        with lock:
            out.write(json.dumps(record) + "\n")

    def scraper():
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.time()
            t0 = time.monotonic()
            code = "OK"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.scrape_port, timeout=5)
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or b"gradserve_rpc_calls_total" not in body:
                    code = f"HTTP_{response.status}"
                conn.close()
            except socket.timeout:
                code = "TIMEOUT"
            except OSError as e:
                code = type(e).__name__
            write({"kind": "scrape", "t": sent, "s": time.monotonic() - t0, "code": code})
            stop.wait(0.5)

    if args.scrape_port:
        threading.Thread(target=scraper, daemon=True).start()

    period = 1.0 / INNOCENT_RATE
    next_at = time.monotonic()
    pending = []
    while not stop.is_set() and time.monotonic() < deadline:
        sent, t0 = time.time(), time.monotonic()
        future = call.future(request, timeout=INNOCENT_DEADLINE)

        def done(f, sent=sent, t0=t0):
            elapsed = time.monotonic() - t0
            try:
                f.result()
                code = "OK"
            except grpc.FutureCancelledError:
                code = "CANCELLED"
            except grpc.RpcError as e:
                code = e.code().name
            write({"kind": "call", "t": sent, "s": elapsed, "code": code})

        future.add_done_callback(done)
        pending.append(future)
        next_at += period
        stop.wait(max(0.0, next_at - time.monotonic()))
    end = time.monotonic() + INNOCENT_DEADLINE + 1
    for f in pending:
        try:
            f.result(timeout=max(0.0, end - time.monotonic()))
        except Exception:  # noqa: BLE001 - the callback recorded it
            pass
    out.close()


# --- attacks (child process) ---------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.extra = {}

    def add(self, code, n=1):
        with self.lock:
            self.counts[code] += n


def unary_loop(tally, call, payload, end, timeout, metadata=None, pause_on_unavailable=0.05):
    """Sends `payload` again and again until `end` (monotonic); a call still in flight at `end`
    is cancelled and counted as IN_FLIGHT_AT_END."""
    while time.monotonic() < end:
        future = call.future(payload, timeout=timeout, metadata=metadata)
        try:
            future.result(timeout=max(0.0, end - time.monotonic()))
            tally.add("OK")
        except grpc.FutureTimeoutError:
            future.cancel()
            tally.add("IN_FLIGHT_AT_END")
            return
        except grpc.FutureCancelledError:
            tally.add("CANCELLED")
        except grpc.RpcError as e:
            tally.add(e.code().name)
            with tally.lock:  # the server's first message per code says which limit hit
                tally.extra.setdefault("first_details", {}).setdefault(
                    e.code().name, (e.details() or "")[:200])
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(pause_on_unavailable)


def run_threads(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def attack_planner(args, tally, end):
    payload = planner_request().SerializeToString()
    tally.extra["request_bytes"] = len(payload)
    threads = []
    for i in range(4):
        channel = gc.connect(args.target, token_env=None)
        timeout = 0.001 if i % 2 == 0 else max(1.0, args.seconds)  # clients 0, 2: 1 ms deadlines
        call = raw_method(channel, "ComputeGradients")
        threads.append(lambda call=call, timeout=timeout: unary_loop(tally, call, payload, end,
                                                                      timeout))
    return run_threads(threads)


def attack_heavy_check(args, tally, end):
    payload = heavy_check_request().SerializeToString()
    tally.extra["request_bytes"] = len(payload)
    threads = []
    for _ in range(2):
        call = raw_method(gc.connect(args.target, token_env=None), "CheckGradients")
        threads.append(lambda call=call: unary_loop(tally, call, payload, end, 60.0))
    return run_threads(threads)


def attack_unauth_flood(args, tally, end):
    payload = flood_request().SerializeToString()
    tally.extra["request_bytes"] = len(payload)
    threads = []
    for _ in range(8):  # no token: token_env=None ignores $GRADSERVE_AUTH_TOKEN
        call = raw_method(gc.connect(args.target, token_env=None), "ComputeGradients")
        threads.append(lambda call=call: unary_loop(tally, call, payload, end, 60.0))
    return run_threads(threads)


def attack_queue_hog(args, tally, end, concurrency=80):
    payload = hog_request().SerializeToString()
    tally.extra["request_bytes"] = len(payload)
    channel = gc.connect(args.target, token_env=None)
    call = raw_method(channel, "ComputeGradients")
    return run_threads([lambda: unary_loop(tally, call, payload, end, 30.0)
                        for _ in range(concurrency)])


def attack_slow_reader(args, tally, end, connections=6):
    """HTTP/2 by hand (python3-h2): a zero stream receive window (SETTINGS_INITIAL_WINDOW_SIZE 0)
    and never a WINDOW_UPDATE, so the server can never send the ~240 MB answer it computed."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    payload = slow_reader_request().SerializeToString()
    message = b"\x00" + len(payload).to_bytes(4, "big") + payload
    tally.extra["request_bytes"] = len(payload)
    host, port = args.target.rsplit(":", 1)

    def one():
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
        except OSError as e:
            tally.add("CONNECT_" + type(e).__name__)
            return
        sock.settimeout(0.2)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", args.target),
                   (":path", SERVICE + "ComputeGradients"), ("content-type", "application/grpc"),
                   ("te", "trailers")]
        if args.token:
            headers.append(("authorization", f"Bearer {args.token}"))
        conn.send_headers(stream_id, headers)
        sock.sendall(conn.data_to_send())
        sent, outcome, received = 0, None, 0

        def pump():
            nonlocal outcome, received
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return
            if not data:
                outcome = outcome or "CLOSED_BY_SERVER"
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)  # never acknowledged: no WINDOW_UPDATE
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    outcome = outcome or f"RESET_{type(event).__name__}"
                elif isinstance(event, h2.events.TrailersReceived):
                    status = dict((k.decode() if isinstance(k, bytes) else k,
                                   v.decode() if isinstance(v, bytes) else v)
                                  for k, v in event.headers).get("grpc-status", "?")
                    outcome = outcome or f"GRPC_STATUS_{status}"
            out = conn.data_to_send()  # SETTINGS and PING acks only
            if out:
                sock.sendall(out)

        try:
            while sent < len(message) and time.monotonic() < end and outcome is None:
                window = min(conn.local_flow_control_window(stream_id),
                             conn.max_outbound_frame_size)
                if window > 0:
                    chunk = message[sent:sent + window]
                    sent += len(chunk)
                    conn.send_data(stream_id, chunk, end_stream=sent == len(message))
                    sock.sendall(conn.data_to_send())
                else:
                    pump()
            while time.monotonic() < end and outcome is None:
                pump()  # read (and ack) control frames, never open the window
        except (OSError, Exception) as e:  # noqa: BLE001 - h2 protocol errors too
            outcome = outcome or f"ERROR_{type(e).__name__}"
        with tally.lock:
            tally.extra.setdefault("response_bytes_received", []).append(received)
        tally.add(outcome or "HELD_UNREAD_AT_END")
        sock.close()

    return run_threads([one for _ in range(connections)])


def attack_idle_streams(args, tally, end, streams=20):
    """20 StreamGradients without deadlines: even ones send nothing, odd ones only a setup;
    all are held open until the end."""
    channel = gc.connect(args.target, token_env=None)
    stub = gc.stub(channel)
    setup = pb.StreamGradientsRequest(setup=pb.StreamSetup(
        model=innocent_request().model, dtype=pb.DTYPE_FLOAT32))

    def one(index):
        release = threading.Event()

        def requests():
            if index % 2:
                yield setup
            release.wait(max(0.0, end - time.monotonic()))

        call = stub.StreamGradients(requests())
        waiter = threading.Thread(target=lambda: (time.sleep(max(0.0, end - time.monotonic())),
                                                  call.cancel()), daemon=True)
        waiter.start()
        try:
            for _ in call:
                pass
            tally.add("OK")
        except grpc.RpcError as e:
            code = e.code()
            tally.add("HELD_OPEN_AT_END" if code == grpc.StatusCode.CANCELLED and
                      time.monotonic() >= end - 0.05 else code.name)
        release.set()

    return run_threads([lambda i=i: one(i) for i in range(streams)])


def attack_metrics_trickle(args, tally, end):
    """`--connections` TCP connections to the metrics port, one header byte per second."""
    line = (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: " + b"a" * 4096)

    def one():
        while time.monotonic() < end:
            try:
                sock = socket.create_connection(("127.0.0.1", args.metrics_port), timeout=5)
            except OSError:
                tally.add("CONNECT_FAILED")
                time.sleep(0.5)
                continue
            tally.add("CONNECTED")
            try:
                for byte in line:
                    if time.monotonic() >= end:
                        break
                    sock.sendall(bytes([byte]))
                    time.sleep(1.0)
                else:
                    tally.add("HEADER_EXHAUSTED")
            except OSError:
                tally.add("CLOSED_BY_SERVER")
            sock.close()

    return run_threads([one for _ in range(args.connections)])


ATTACKS = {
    "planner": attack_planner,
    "heavy-check": attack_heavy_check,
    "unauth-flood": attack_unauth_flood,
    "slow-reader": attack_slow_reader,
    "idle-streams": attack_idle_streams,
    "metrics-trickle": attack_metrics_trickle,
    "queue-hog": attack_queue_hog,
}


def attack_main(args):
    tally = Tally()
    end = time.monotonic() + args.seconds
    # SIGTERM ends the attack early (the driver's sigterm row): results are still printed.
    signal.signal(signal.SIGTERM, lambda *_: None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = ATTACKS[args.name](args, tally, end)
    while any(t.is_alive() for t in threads) and not stop.is_set():
        stop.wait(0.1)
        if time.monotonic() > end + 10:  # a thread stuck in a blocking call: give up on it
            tally.add("STUCK_AT_END", sum(t.is_alive() for t in threads))
            break
    print(json.dumps({"statuses": dict(tally.counts), "extra": tally.extra}), flush=True)
    os._exit(0)  # do not wait for gRPC's threads or cancelled calls


# --- the driver ----------------------------------------------------------------------------------

def free_dual_stack_port():
    """A port free on both 127.0.0.1 and [::1] right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
            v4.bind(("127.0.0.1", 0))
            port = v4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
                    v6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both 127.0.0.1 and [::1]")


class Server:
    """One gradserve on a free loopback port (--listen 127.0.0.1:0, the port read back from its
    start-up line), its log in a temporary file; its pid appended to the pidfile."""

    def __init__(self, binary, flags, pidfile, env=None, port=0, metrics=False, log_dir=None):
        self.flags = list(flags)
        if not any(f.startswith("--shutdown-grace") for f in self.flags):
            self.flags += ["--shutdown-grace", "5"]
        self.grace = float(flag_value(self.flags, "--shutdown-grace"))
        self.drain = float(flag_value(self.flags, "--drain-delay") or 0)
        # The attackers connect over IPv4, the innocent client over IPv6 loopback: two client
        # addresses to the server, as two hosts would be (its per-client shares key on them).
        if port == 0:
            port = free_dual_stack_port()
        argv = [binary, "--listen", f"127.0.0.1:{port}", "--also-listen", f"[::1]:{port}"]
        argv += self.flags
        if metrics:
            argv += ["--metrics-listen", "127.0.0.1:0"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="gradserve-abuse-", suffix=".log",
                                               dir=log_dir, delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        if pidfile:
            with open(pidfile, "a") as f:
                f.write(f"{self.pid}\n")
        self.port = self.metrics_port = None
        limit = time.monotonic() + 15
        while time.monotonic() < limit:
            text = open(self.log.name).read()
            m = re.search(r"listening on .*\(port (\d+)\)", text)
            mm = re.search(r"Prometheus metrics on .*\(port (\d+)\)", text)
            if m and (mm or not metrics):
                self.port = int(m.group(1))
                self.metrics_port = int(mm.group(1)) if mm else None
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"gradserve exited during start-up:\n{text}")
            time.sleep(0.05)
        if self.port is None:
            self.kill()
            raise RuntimeError("gradserve did not report its port within 15 s (keep "
                               "--log-level at info or below):\n" + open(self.log.name).read())
        self.target = f"127.0.0.1:{self.port}"
        self.innocent_target = f"[::1]:{self.port}"

    def stop(self, wait=None):
        """SIGTERM; SIGKILL if not gone after `wait` s. Returns (seconds to exit, exit code)."""
        if self.proc.poll() is not None:
            return 0.0, self.proc.returncode
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=wait if wait is not None else self.grace + self.drain + 10)
            return time.monotonic() - t0, rc
        except subprocess.TimeoutExpired:
            self.kill()
            return time.monotonic() - t0, "KILLED"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines=15):
        return open(self.log.name).read().splitlines()[-lines:]

    def close(self):
        self.kill()
        os.unlink(self.log.name)


def flag_value(flags, name):
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            return flags[i + 1]
        if f.startswith(name + "="):
            return f.split("=", 1)[1]
    return None


class Sampler(threading.Thread):
    """VmRSS every 100 ms; GetStats (calls in flight, queue, open streams) every 0.5 s."""

    def __init__(self, server, token):
        super().__init__(daemon=True)
        self.server, self.stop_event = server, threading.Event()
        self.rss = []  # (time.time(), KiB)
        self.stats = []  # (time.time(), in_flight, queue, open_streams)
        self.stub = gc.stub(gc.connect(server.target, token=token or None, token_env=None))
        self.token = token
        threading.Thread(target=self.stats_loop, daemon=True).start()

    def run(self):
        while not self.stop_event.wait(0.1):
            s = proc_status(self.server.pid)
            if s is None:
                return
            self.rss.append((time.time(), s[0]))

    def stats_loop(self):
        while not self.stop_event.wait(0.5):
            try:
                r = self.stub.GetStats(pb.GetStatsRequest(), timeout=1.0)
                self.stats.append((time.time(), r.calls_in_flight, r.queue_length,
                                   r.open_streams))
            except grpc.RpcError:
                self.stats.append((time.time(), None, None, None))
            except ValueError:  # channel closed at the end
                return

    def rss_between(self, t0, t1):
        return [kib for t, kib in self.rss if t0 <= t <= t1]

    def stats_between(self, t0, t1):
        return [s for s in self.stats if t0 <= s[0] <= t1]


# Attackers run at nice 19. On the bench machine they share its 2 cores with the server, and
# their own work (serialising and sending 12-200 MB messages from 80 threads: most of a core)
# would otherwise be taken from the server, which an attacker on another host cannot do. The
# table measures what the server lets one client do to another, not what one process can do to
# another on the same machine.
ATTACKER_NICE = 19


def spawn(args_list, stdout=subprocess.PIPE, nice=0):
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args_list,
                             stdout=stdout, stderr=sys.stderr, stdin=subprocess.DEVNULL,
                             preexec_fn=(lambda: os.nice(nice)) if nice else None)
    _children.append(child)
    return child


def start_innocent(target, log, token, max_seconds, scrape_port=None):
    argv = ["innocent", "--target", target, "--log", log, "--max-seconds", str(max_seconds)]
    if token:
        argv += ["--token", token]
    if scrape_port:
        argv += ["--scrape-port", str(scrape_port)]
    return spawn(argv, stdout=subprocess.DEVNULL)


def start_attack(name, target, seconds, token=None, **extra):
    argv = ["attack", name, "--target", target, "--seconds", str(seconds)]
    if token:
        argv += ["--token", token]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return spawn(argv, nice=ATTACKER_NICE)


def attack_result(child, timeout):
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"statuses": {"ATTACKER_CRASHED": 1}, "extra": {}}


def stop_innocent(child):
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=INNOCENT_DEADLINE + 5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def read_records(path, kind):
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r["kind"] == kind:
                out.append(r)
    return out


def latency_summary(records, t0, t1, fail_latency):
    """p50/p99 in ms over the calls *sent* in [t0, t1]; a failed call counts as `fail_latency`."""
    window = [r for r in records if t0 <= r["t"] <= t1]
    lat = [r["s"] if r["code"] == "OK" else fail_latency for r in window]
    codes = collections.Counter(r["code"] for r in window)
    return {"calls": len(window), "codes": dict(codes),
            "p50_ms": None if not lat else 1000 * percentile(lat, 50),
            "p99_ms": None if not lat else 1000 * percentile(lat, 99)}


ROWS = [
    # name, attack processes, server options
    ("planner", ["planner"], {}),
    ("heavy-check", ["heavy-check"], {}),
    ("unauth-flood", ["unauth-flood"], {"token": True}),
    ("slow-reader", ["slow-reader"], {}),
    ("idle-streams", ["idle-streams"], {}),
    ("metrics-trickle-2", ["metrics-trickle"], {"metrics": True, "connections": 2}),
    ("metrics-trickle-16", ["metrics-trickle"], {"metrics": True, "connections": 16}),
    ("queue-hog", ["queue-hog"], {}),
    ("sigterm", ["planner", "heavy-check", "queue-hog"], {"sigterm": True}),
]


def innocent_stream_check(target, token):
    """Attack 5's question: can a new stream from the innocent client open and complete a step?"""
    request = innocent_request()
    params = [(gc.from_tensor(p.weight), gc.from_tensor(p.bias)) for p in request.parameters]
    channel = gc.connect(target, token=token or None, token_env=None)
    t0 = time.monotonic()
    try:
        stream = gc.TrainingStream(channel, request.model, np.float32, timeout=5.0)
        stream.step(gc.from_tensor(request.inputs), gc.from_tensor(request.targets),
                    parameters=params)
        stream.close()
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    except StopIteration:
        code = "NO_ANSWER"
    channel.close()
    return {"status": code, "seconds": round(time.monotonic() - t0, 3)}


def run_row(args, name, attacks, opts, work):
    token = "abuse-bench-token" if opts.get("token") else None
    env = dict(os.environ)
    env.pop("GRADSERVE_AUTH_TOKEN", None)
    if token:
        env["GRADSERVE_AUTH_TOKEN"] = token
    print(f"== {name}", file=sys.stderr, flush=True)
    server = Server(args.server, args.server_flags, args.pidfile, env=env,
                    metrics=opts.get("metrics", False))
    row = {"row": name, "attacks": attacks, "server_flags": server.flags}
    try:
        info_stub = gc.stub(gc.connect(server.target, token=token, token_env=None))
        info = info_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        row["threads"] = info.threads
        sampler = Sampler(server, token)
        sampler.start()
        log = os.path.join(work, f"{name}.innocent.jsonl")
        budget = args.warmup + args.idle_seconds + args.attack_seconds + 40
        innocent = start_innocent(server.innocent_target, log, token, budget,
                                  scrape_port=server.metrics_port)
        time.sleep(args.warmup)
        idle0 = time.time()
        time.sleep(args.idle_seconds)
        idle1 = time.time()
        start_rss = proc_status(server.pid)[0]
        hwm_before = proc_status(server.pid)[1]
        t0 = time.time()
        extra = {"connections": opts["connections"]} if "connections" in opts else {}
        if server.metrics_port:
            extra["metrics_port"] = server.metrics_port
        seconds = args.attack_seconds
        children = [start_attack(a, server.target, seconds + (30 if opts.get("sigterm") else 0),
                                 token=None, **extra) for a in attacks]
        if name == "idle-streams":
            time.sleep(min(2.0, seconds / 2))
            row["innocent_stream"] = innocent_stream_check(server.innocent_target, token)
            time.sleep(max(0.0, t0 + seconds - time.time()))
        else:
            time.sleep(seconds)
        if opts.get("sigterm"):
            t_term = time.time()
            exit_s, rc = server.stop()
            row["sigterm"] = {"exit_seconds": round(exit_s, 3), "exit_code": rc,
                              "grace": server.grace, "drain_delay": server.drain}
            t1 = t_term
            for c in children:
                if c.poll() is None:
                    c.send_signal(signal.SIGTERM)
        t1 = time.time() if not opts.get("sigterm") else t1
        results = [attack_result(c, timeout=15) for c in children]
        stats = collections.Counter()
        extras = {}
        for a, r in zip(attacks, results):
            for code, n in r["statuses"].items():
                stats[f"{a}:{code}" if len(attacks) > 1 else code] += n
            extras.update({f"{a}.{k}" if len(attacks) > 1 else k: v
                           for k, v in r["extra"].items()})
        row["attacker_statuses"] = dict(stats)
        row["attacker_extra"] = extras
        after = proc_status(server.pid)
        stop_innocent(innocent)
        rss = sampler.rss_between(t0, t1 + 0.2)
        hwm_after = after[1] if after else None
        peak = max(rss + ([hwm_after] if hwm_after and hwm_after > hwm_before else []),
                   default=None)
        row["rss_mib"] = {"start": start_rss / 1024, "peak": peak / 1024 if peak else None}
        grpc_stats = sampler.stats_between(t0, t1)
        seen = [s for s in grpc_stats if s[1] is not None]
        row["getstats"] = {"samples": len(grpc_stats), "failed": len(grpc_stats) - len(seen),
                           "max_calls_in_flight": max((s[1] for s in seen), default=None),
                           "max_queue_length": max((s[2] for s in seen), default=None),
                           "max_open_streams": max((s[3] for s in seen), default=None)}
        calls = read_records(log, "call")
        row["innocent_idle"] = latency_summary(calls, idle0, idle1, INNOCENT_DEADLINE)
        row["innocent_attack"] = latency_summary(calls, t0, t1, INNOCENT_DEADLINE)
        if server.metrics_port:
            scrapes = read_records(log, "scrape")
            row["scrape_idle"] = latency_summary(scrapes, idle0, idle1, 5.0)
            row["scrape_attack"] = latency_summary(scrapes, t0, t1, 5.0)
        if not opts.get("sigterm"):
            settle_until = t1 + args.settle_seconds
            while time.time() < settle_until and server.proc.poll() is None:
                time.sleep(0.1)
            s = proc_status(server.pid)
            row["rss_mib"]["idle_after"] = s[0] / 1024 if s else None
            row["rss_mib"]["settle_seconds"] = args.settle_seconds
            row["server_alive"] = server.proc.poll() is None
            exit_s, rc = server.stop(wait=1)  # the sigterm row times a clean exit
            row["stop"] = {"exit_seconds": round(exit_s, 3), "exit_code": rc}
        sampler.stop_event.set()
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
        row["error"] = f"{type(e).__name__}: {e}"
        row["server_log_tail"] = server.tail()
    finally:
        server.close()
        for c in _children:
            if c.poll() is None:
                c.kill()
        _children.clear()
    judge(args, row)
    return row


def judge(args, row):
    checks = {}
    if "error" in row:
        row["pass"] = False
        row["checks"] = {"ran": False}
        return
    lat_idle, lat_att = ("scrape_idle", "scrape_attack") if "scrape_idle" in row else (
        "innocent_idle", "innocent_attack")
    idle_p99, att_p99 = row[lat_idle]["p99_ms"], row[lat_att]["p99_ms"]
    if not row.get("sigterm") or att_p99 is not None:
        checks["latency"] = (idle_p99 is not None and att_p99 is not None
                             and att_p99 <= 10 * idle_p99
                             and row[lat_att]["codes"].get("OK", 0) > 0)
    peak = row["rss_mib"]["peak"]
    checks["peak_rss"] = peak is not None and peak <= args.rss_budget_mib
    if "idle_after" in row["rss_mib"]:
        after = row["rss_mib"]["idle_after"]
        checks["idle_rss"] = after is not None and (
            after - row["rss_mib"]["start"] <= 64 * row.get("threads", 1))
    if "sigterm" in row:
        s = row["sigterm"]
        checks["sigterm_exit"] = (s["exit_code"] == 0 and
                                  s["exit_seconds"] <= s["grace"] + s["drain_delay"] + 0.5)
    if "innocent_stream" in row:
        checks["innocent_stream"] = row["innocent_stream"]["status"] == "OK"
    row["checks"] = checks
    row["pass"] = all(checks.values())


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def codes_str(codes):
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1])) or "-"


def write_report(args, rows, path_md, path_json, started, elapsed):
    commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    meta = {"date": started, "commit": commit, "server": os.path.relpath(args.server, REPO),
            "server_flags": args.server_flags, "quick": args.quick,
            "attack_seconds": args.attack_seconds, "idle_seconds": args.idle_seconds,
            "settle_seconds": args.settle_seconds, "rss_budget_mib": args.rss_budget_mib,
            "innocent": {"request": "Linear(16,16)-ReLU-Linear(16,4), MSE, batch 8, float32",
                         "rate_per_s": INNOCENT_RATE, "deadline_s": INNOCENT_DEADLINE},
            "cores": os.cpu_count(), "elapsed_seconds": round(elapsed, 1)}
    with open(path_json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    L = []
    L.append("# gradserve under abuse (`bench/abuse.sh`)")
    L.append("")
    L.append(f"- {started} UTC, commit `{commit}`, {os.cpu_count()} cores; server "
             f"`{meta['server']}`, extra flags `{' '.join(args.server_flags) or '(none)'}` "
             f"(`--shutdown-grace 5` unless given); run took {elapsed:.0f} s"
             f"{' (--quick)' if args.quick else ''}")
    L.append(f"- each row: a fresh server; the innocent client (Linear(16,16)-ReLU-Linear(16,4), "
             f"MSE, batch 8, float32, {INNOCENT_RATE:.0f} calls/s open loop, "
             f"{INNOCENT_DEADLINE:.0f} s deadline; a failed call counts as "
             f"{INNOCENT_DEADLINE * 1000:.0f} ms) runs {args.idle_seconds:g} s idle, then "
             f"{args.attack_seconds:g} s under the attack; RSS sampled every 100 ms (peak: "
             f"max of VmRSS samples and VmHWM), idle RSS read {args.settle_seconds:g} s after "
             f"the attack stopped; attackers run at nice {ATTACKER_NICE} (their own CPU would "
             f"otherwise come out of the server's 2 cores, which a remote attacker's cannot)")
    L.append(f"- targets: innocent p99 <= 10x idle p99 (metrics rows: scrape p99, 5 s "
             f"timeout); peak RSS <= {args.rss_budget_mib} MiB (`--rss-budget-mib`); idle RSS "
             f"<= start + 64 MiB x compute threads; SIGTERM exit 0 within drain + grace "
             f"(+0.5 s); idle-streams also needs the innocent's new stream to complete a step")
    L.append("")
    L.append("| attack | innocent idle p50/p99 ms | under attack p50/p99 ms | innocent statuses "
             "under attack | attacker statuses | in flight (max) | RSS start / peak / idle "
             "after MiB | SIGTERM exit s | result |")
    L.append("|---|---:|---:|---|---|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            L.append(f"| {r['row']} | | | | | | | | **ERROR**: {r['error'][:200]} |")
            continue
        key_i, key_a = ("scrape_idle", "scrape_attack") if "scrape_idle" in r else (
            "innocent_idle", "innocent_attack")
        i, a = r[key_i], r[key_a]
        label = r["row"] + (" (scrapes of /metrics)" if key_i == "scrape_idle" else "")
        rss = r["rss_mib"]
        sig = r.get("sigterm")
        sig_s = "-" if not sig else (f"{sig['exit_seconds']:.2f} (rc {sig['exit_code']}, "
                                     f"grace {sig['grace']:g})")
        failed = [k for k, v in r["checks"].items() if not v]
        verdict = "PASS" if r["pass"] else "**FAIL** (" + ", ".join(failed) + ")"
        att = codes_str(r["attacker_statuses"])
        if "innocent_stream" in r:
            att += f"; innocent's new stream: {r['innocent_stream']['status']}"
        L.append(f"| {label} | {fmt(i['p50_ms'])} / {fmt(i['p99_ms'])} | "
                 f"{fmt(a['p50_ms'])} / {fmt(a['p99_ms'])} | {codes_str(a['codes'])} | {att} | "
                 f"{fmt(r['getstats']['max_calls_in_flight'], 0)} | "
                 f"{fmt(rss['start'], 0)} / {fmt(rss['peak'], 0)} / "
                 f"{fmt(rss.get('idle_after'), 0)} | {sig_s} | {verdict} |")
    L.append("")
    L.append("Columns: *in flight (max)* is GetStats' calls_in_flight, polled every 0.5 s during "
             "the attack (`-`: GetStats never answered within 1 s). The JSON next to this file "
             "has every figure (GetStats' queue length and open streams, request sizes, the "
             "server flags, the innocent's status counts in the idle window).")
    with open(path_md, "w") as f:
        f.write("\n".join(L) + "\n")
    return "\n".join(L)


def run_main(args):
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t_start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="gradserve-abuse-") as work:
        for name, attacks, opts in ROWS:
            if only and name not in only and name.rsplit("-", 1)[0] not in only:
                continue
            row = run_row(args, name, attacks, opts, work)
            rows.append(row)
            print(f"   {name}: {'PASS' if row['pass'] else 'FAIL'} {row.get('checks')}"
                  f"{' ' + row['error'] if 'error' in row else ''}", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - t_start
    md = write_report(args, rows, os.path.join(args.out, args.name + ".md"),
                      os.path.join(args.out, args.name + ".json"), started, elapsed)
    print(md)
    return 0 if all(r.get("pass") for r in rows) else 1


# --- rolling restarts ----------------------------------------------------------------------------

def rolling_main(args):
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t_start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    flags = list(args.server_flags)
    if flag_value(flags, "--drain-delay") is None:
        flags += ["--drain-delay", "1"]
    env = dict(os.environ)
    env.pop("GRADSERVE_AUTH_TOKEN", None)
    servers = [Server(args.server, flags, args.pidfile, env=env) for _ in range(3)]
    ports = [s.port for s in servers]
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    config = gc.service_config()
    channel = gc.connect(target, token_env=None,
                         options=[("grpc.service_config", config), ("grpc.enable_retries", 1)])
    call = raw_method(channel, "ComputeGradients")
    payload = innocent_request().SerializeToString()
    codes = collections.Counter()
    failures = []
    lock = threading.Lock()
    stop = threading.Event()
    hard_end = time.monotonic() + args.restarts * 20 + 60

    def client():
        while not stop.is_set() and time.monotonic() < hard_end:
            try:
                call(payload, timeout=5.0)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                with lock:
                    if len(failures) < 20:
                        failures.append({"t": round(time.monotonic() - t_start, 2),
                                         "code": code, "details": (e.details() or "")[:200]})
            with lock:
                codes[code] += 1
            time.sleep(0.01)

    threads = run_threads([client for _ in range(4)])
    restarts = []
    error = None
    try:
        time.sleep(2)
        for i in range(args.restarts):
            if time.monotonic() > hard_end:
                error = "time limit reached"
                break
            k = i % 3
            exit_s, rc = servers[k].stop()
            servers[k].close()
            t0 = time.monotonic()
            for attempt in range(50):  # the port may be briefly unavailable
                try:
                    servers[k] = Server(args.server, flags, args.pidfile, env=env, port=ports[k])
                    break
                except RuntimeError:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
            restarts.append({"replica": k, "exit_seconds": round(exit_s, 3), "exit_code": rc,
                             "restart_seconds": round(time.monotonic() - t0, 3)})
            print(f"   restart {i + 1}/{args.restarts}: replica {k} exit {exit_s:.2f} s rc {rc}; "
                  f"calls so far {dict(codes)}", file=sys.stderr, flush=True)
            time.sleep(args.gap)
        time.sleep(1)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        channel.close()
        for s in servers:
            s.stop(wait=10)
            s.close()
    elapsed = time.monotonic() - t_start
    total = sum(codes.values())
    lost = total - codes.get("OK", 0)
    result = {"meta": {"date": started, "restarts_requested": args.restarts,
                       "server_flags": servers[0].flags, "target": target,
                       "service_config_file": os.path.relpath(
                           os.path.normpath(gc.SERVICE_CONFIG_FILE), REPO),
                       "elapsed_seconds": round(elapsed, 1)},
              "calls": total, "codes": dict(codes), "lost": lost, "first_failures": failures,
              "restarts": restarts, "error": error,
              "pass": lost == 0 and error is None and len(restarts) == args.restarts}
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    bad_exits = sum(1 for r in restarts if r["exit_code"] != 0)
    md = "\n".join([
        "# gradserve rolling restarts (`bench/abuse.sh --rolling N`)", "",
        f"- {started} UTC; 3 replicas on 127.0.0.1 ports {', '.join(map(str, ports))}, flags "
        f"`{' '.join(servers[0].flags)}`; one replica at a time gets SIGTERM and is restarted on its port, "
        f"{args.gap:g} s between restarts; run took {elapsed:.0f} s",
        f"- client: 4 threads, closed loop, the innocent call with a 5 s deadline, on one channel "
        f"`{target}` with the service config `{result['meta']['service_config_file']}` "
        f"(round_robin, retries on UNAVAILABLE)", "",
        "| restarts | calls | lost (non-OK) | statuses | non-zero exits | result |",
        "|---:|---:|---:|---|---:|---|",
        f"| {len(restarts)} | {total} | {lost} | {codes_str(codes)} | {bad_exits} | "
        f"{'PASS' if result['pass'] else '**FAIL**'}{' (' + error + ')' if error else ''} |",
        ""] + ([f"First failures: `{json.dumps(failures[:5])}`", ""] if failures else []))
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return 0 if result["pass"] else 1


def main():
    argv = sys.argv[1:]
    server_flags = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_flags = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("run", "rolling"):
        p = sub.add_parser(mode)
        p.add_argument("--server", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--pidfile")
        if mode == "run":
            p.add_argument("--name", default="abuse")
            p.add_argument("--quick", action="store_true")
            p.add_argument("--attack-seconds", type=float)
            p.add_argument("--rss-budget-mib", type=float, default=3072)
            p.add_argument("--only", help="comma-separated rows (planner, heavy-check, ...)")
        else:
            p.add_argument("--name", default="abuse-rolling")
            p.add_argument("--restarts", type=int, default=50)
            p.add_argument("--gap", type=float, default=0.5)
    p = sub.add_parser("innocent")
    p.add_argument("--target", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--token")
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--scrape-port", type=int)
    p = sub.add_parser("attack")
    p.add_argument("name", choices=sorted(ATTACKS))
    p.add_argument("--target", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--token")
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--metrics-port", type=int)
    args = parser.parse_args(argv)
    args.server_flags = server_flags
    # The server as it runs in a container whose memory limit is the RSS budget, where its
    # --max-memory-bytes defaults to 40% of that limit (this machine has no such limit).
    if (hasattr(args, "rss_budget_mib") and
            not any(f.startswith("--max-memory-bytes") for f in server_flags)):
        args.server_flags = server_flags + ["--max-memory-bytes",
                                            str(int(args.rss_budget_mib * (1 << 20)) // 5 * 2)]
    if args.mode == "innocent":
        return innocent_main(args)
    if args.mode == "attack":
        return attack_main(args)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    atexit.register(_kill_children)
    args.server = os.path.abspath(args.server)
    if args.mode == "rolling":
        return rolling_main(args)
    if args.attack_seconds is None:
        args.attack_seconds = 4.0 if args.quick else 10.0
    args.idle_seconds = 2.0 if args.quick else 5.0
    args.warmup = 0.5 if args.quick else 1.0
    args.settle_seconds = 10.0
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
