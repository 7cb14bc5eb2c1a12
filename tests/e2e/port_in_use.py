#!/usr/bin/python3
"""End to end: a second gradserve on a port the first one holds must exit at once, non-zero,
with one clear line naming the address; it used to start (SO_REUSEPORT) and take half the calls.

Checks --listen (in full and as a bare port) and --metrics-listen, and that a malformed
--listen exits 2 naming the flag. Only 127.0.0.1 is bound.

    tests/e2e/port_in_use.py SERVER_BINARY
"""
import re
import subprocess
import sys
import tempfile
import time

# A refusal takes milliseconds; 5 s leaves room for a loaded machine yet fails a server that
# starts and serves (it would run until killed at 10 s).
QUICK_SECONDS = 5.0


def start_first(server, log):
    process = subprocess.Popen(
        [server, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--threads", "1",
         "--shutdown-grace", "1"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(log.name) as f:
            text = f.read()
        grpc = re.search(r" listening on .*\(port (\d+)\)", text)
        metrics = re.search(r"Prometheus metrics on .*\(port (\d+)\)", text)
        if grpc and metrics:
            return process, grpc.group(1), metrics.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    sys.exit("the first gradserve did not start:\n" + open(log.name).read())


def expect_refusal(server, args, want_code, want_text):
    start = time.monotonic()
    try:
        done = subprocess.run([server, "--threads", "1", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return f"{args}: still running after 10 s (it should have refused the address)"
    seconds = time.monotonic() - start
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print(f"{' '.join(args)}: exit {done.returncode} after {seconds:.2f} s: {done.stdout.strip()}")
    if done.returncode == 0 or (want_code is not None and done.returncode != want_code):
        return f"{args}: exit {done.returncode}, expected {want_code or 'non-zero'}"
    if seconds > QUICK_SECONDS:
        return f"{args}: took {seconds:.2f} s, expected under {QUICK_SECONDS} s"
    if len(lines) != 1 or want_text not in lines[0]:
        return f"{args}: expected one line containing {want_text!r}, got:\n{done.stdout}"
    return None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    server = sys.argv[1]
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        first, port, metrics_port = start_first(server, log)
        try:
            in_use = "is already in use by another process"
            failures = [
                expect_refusal(server, ["--listen", f"127.0.0.1:{port}"], 1,
                               f"127.0.0.1:{port} {in_use}"),
                expect_refusal(server, ["--listen", port], 1, f"127.0.0.1:{port} {in_use}"),
                expect_refusal(server, ["--listen", "127.0.0.1:0", "--metrics-listen",
                                        f":{metrics_port}"], 1,
                               f"127.0.0.1:{metrics_port} {in_use}"),
                expect_refusal(server, ["--listen", "127.0.0.1:http"], 2,
                               '--listen "127.0.0.1:http"'),
            ]
        finally:
            first.terminate()
            first.wait(timeout=10)
    failures = [f for f in failures if f]
    for failure in failures:
        print("FAIL: " + failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
