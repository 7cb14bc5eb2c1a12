"""Local gradserve replicas and gradserve-optimizer processes for the scale-out tests and
bench/scale.py: started on free loopback ports, ready when their health service says SERVING,
stopped by signal with their exit status checked.

    with Cluster(work_dir) as cluster:
        replica = cluster.gradserve(GRADSERVE, "--threads", "1")   # port 0: the kernel picks
        replica.stop()                                             # SIGTERM, exit 0 expected
        replica.start()                                            # again, on the same port

The gradserve processes listen on port 0 and the kernel's choice is read back from their
"listening on ... (port N)" line (as tests/e2e/server_lib.sh does), so parallel CTest runs
never collide; a restart reuses that port, which is how a replica comes back behind a fixed
address. A process that reports no port is given one reserved here (bound, then released just
before its start): a small window another process could take, never seen so far.

Needs the generated stubs and client/python on sys.path (the gradserve package).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from typing import List, Optional

import grpc

from gradserve import client as gc

_PORT_LINE = re.compile(r" listening on .*\(port (\d+)\)")

# Channels to one replica each, as a sharded client wants them: no retries on the channel (the
# shared service config would retry a stopped replica for ~1.5 s before the sharded client
# moves the part to the next one), and a restarted replica found again within a second instead
# of after gRPC's reconnect backoff, which grows to minutes.
CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One server process: `binary args... --listen 127.0.0.1:PORT`, its output in `log`."""

    def __init__(self, name: str, binary: str, args: List[str], log: str,
                 port_from_log: bool = True):
        self.name, self.binary, self.args, self.log = name, binary, list(args), log
        self.port_from_log = port_from_log
        self.port: Optional[int] = None
        self.popen: Optional[subprocess.Popen] = None
        self._channel: Optional[grpc.Channel] = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Process":
        """Starts (or restarts, on the same port) and waits until health reports SERVING."""
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is running"
        if self.port is None and not self.port_from_log:
            self.port = free_port()
        listen = f"127.0.0.1:{0 if self.port is None else self.port}"
        with open(self.log, "a") as log:
            log.write(f"--- {self.name}: {self.binary} --listen {listen} {' '.join(self.args)}\n")
            log.flush()
            offset = log.tell()
            self.popen = subprocess.Popen([self.binary, "--listen", listen, *self.args],
                                          stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # The start-up line first, also on a restart: a channel that tries to connect before
        # the port is open backs off for seconds.
        while self.port_from_log:
            self._check_alive()
            with open(self.log) as log:
                log.seek(offset)
                match = _PORT_LINE.search(log.read())
            if match:
                self.port = int(match.group(1))
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} reported no port in {timeout} s:\n{self.tail()}")
            time.sleep(0.05)
        # Health through a channel of its own: the long-lived one may be in reconnect backoff
        # from before a restart, which says nothing about this process.
        probe = gc.connect(self.target, options=CHANNEL_OPTIONS)
        try:
            while True:
                self._check_alive()
                try:
                    if gc.health(probe, timeout=1.0) == "SERVING":
                        break
                except grpc.RpcError:
                    pass  # Not listening yet.
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"{self.name} not SERVING within {timeout} s:\n{self.tail()}")
                time.sleep(0.05)
        finally:
            probe.close()
        if self._channel is None:
            # Kept across restarts, as a client's channel to a fixed address is: it reconnects.
            self._channel = gc.connect(self.target, options=CHANNEL_OPTIONS)
        # Connected now, so that the caller's next call goes to this process, not elsewhere
        # because its channel is still waiting to retry the connection.
        grpc.channel_ready_future(self._channel).result(max(deadline - time.monotonic(), 1.0))
        return self

    def _check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode} during start-up:"
                               f"\n{self.tail()}")

    def channel(self) -> grpc.Channel:
        """A channel to this process, the same one across restarts."""
        return self._channel

    def close(self) -> None:
        self.kill()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends `sig` and returns the exit status (negative: killed by that signal)."""
        if not self.running():
            return self.popen.returncode if self.popen else 0
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise RuntimeError(f"{self.name} still running {timeout} s after "
                               f"{signal.Signals(sig).name}:\n{self.tail()}")

    def kill(self) -> None:
        if self.running():
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            with open(self.log) as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    """The processes of one test, each with a log under `work_dir`; all killed on exit."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.processes: List[Process] = []

    def add(self, name: str, binary: str, *args: str, port_from_log: bool = True,
            start: bool = True) -> Process:
        process = Process(name, binary, list(args), os.path.join(self.work_dir, f"{name}.log"),
                          port_from_log)
        self.processes.append(process)
        return process.start() if start else process

    def gradserve(self, binary: str, *args: str, name: Optional[str] = None) -> Process:
        # gradserve waits out its whole --shutdown-grace after SIGTERM while any client holds a
        # connection open, idle or not (0.5 s with none), and every replica here has clients:
        # the calls take milliseconds, so a short grace keeps each stop short.
        extra = [] if any(a.startswith("--shutdown-grace") for a in args) else \
            ["--shutdown-grace", "1"]
        return self.add(name or f"gradserve{len(self.processes)}", binary, *args, *extra)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.close()
