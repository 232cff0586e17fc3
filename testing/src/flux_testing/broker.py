"""A real ``flux-broker`` process for tests.

The broker runs as ``python -m flux_broker`` from the test's own environment, binding gRPC and
its embedded NATS server to free ports on 127.0.0.1 (``--port 0 --embedded-nats-port 0``), and
reports them through its ``--ready-file``, so there is no window in which another process can
take a port the test chose. Its output goes to a log file that failure messages quote.

This module imports neither ``flux_proto`` nor ``flux_broker``: suites that load another
Liftbridge client's generated code (which would collide with ``flux_proto`` in protobuf's
descriptor pool) use it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from flux_testing.wait import WaitTimeoutError, wait_for

__all__ = ["BrokerProcess", "BrokerProcessError", "broker_command", "stop_all"]

STARTUP_TIMEOUT_S: Final = 30.0  # cold start on a shared 2-core machine: imports, NATS, recovery
STOP_TIMEOUT_S: Final = 20.0  # graceful shutdown is bounded by the broker's own 5 s grace
_OUTPUT_TAIL_BYTES: Final = 6000
_POLL_INTERVAL_S: Final = 0.02


class BrokerProcessError(RuntimeError):
    """The broker did not start, or did not stop in time; the message quotes its output."""


@dataclass(slots=True)
class BrokerProcess:
    """One running broker process.

    Attributes:
        data_dir: Its data directory.
        work_dir: Where its ready file and output log live (outside the data directory).
        args: The extra command-line arguments it was started with.
        env: Extra environment variables it was started with.
        address: Its gRPC address, ``127.0.0.1:PORT``.
        nats_url: The URL of the NATS server it uses.
        broker_id: Its broker id.
        pid: Its process id.
        metrics: ``host:port`` of its HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``)
            when started with ``--metrics-port``, else ``""``.
    """

    data_dir: Path
    work_dir: Path
    args: tuple[str, ...]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    address: str = ""
    nats_url: str = ""
    broker_id: str = ""
    pid: int = 0
    metrics: str = ""
    registry: list[BrokerProcess] | None = None
    _log_path: Path = field(default=Path())

    @classmethod
    async def start(
        cls,
        data_dir: Path,
        *,
        work_dir: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        timeout_s: float = STARTUP_TIMEOUT_S,
        registry: list[BrokerProcess] | None = None,
    ) -> BrokerProcess:
        """Start a broker on ``data_dir`` and wait until it serves.

        Args:
            data_dir: The broker's data directory (created if missing).
            work_dir: A directory for the ready file and the output log.
            args: Extra ``flux-broker`` arguments (e.g. ``["--config", path]``); they come
                after the defaults, so they override them.
            env: Extra environment variables (``FLUX_<KEY>`` overrides).
            timeout_s: How long start-up may take.
            registry: A list the process is added to as soon as it runs (and that
                :meth:`restart` passes on), so a fixture can stop every process it caused.

        Raises:
            BrokerProcessError: The broker exited or did not become ready in time.
        """
        extra_env = dict(env or {})
        process, ready_file, log_path = _spawn(data_dir, work_dir, args, extra_env)
        broker = cls(
            data_dir=data_dir,
            work_dir=work_dir,
            args=tuple(args),
            env=extra_env,
            process=process,
            pid=process.pid,
            registry=registry,
            _log_path=log_path,
        )
        if registry is not None:
            registry.append(broker)

        def ready() -> bool:
            if process.poll() is not None:
                raise BrokerProcessError(
                    f"the broker exited with status {process.returncode} during start-up:\n"
                    f"{broker.output_tail()}"
                )
            return ready_file.exists()

        try:
            await wait_for(ready, timeout_s, interval_s=_POLL_INTERVAL_S, message="broker ready")
        except WaitTimeoutError:
            broker.kill()
            raise BrokerProcessError(
                f"the broker was not ready after {timeout_s:g}s:\n{broker.output_tail()}"
            ) from None
        info = _read_ready_file(ready_file)
        broker.address = info["grpc"]
        broker.nats_url = info["nats"]
        broker.broker_id = info["broker_id"]
        broker.metrics = info.get("metrics", "")
        return broker

    async def restart(self, *, timeout_s: float = STARTUP_TIMEOUT_S) -> BrokerProcess:
        """Start a new broker on the same data directory with the same arguments.

        The previous process must have ended (:meth:`stop` or :meth:`kill`). The new one gets
        new ports.
        """
        assert self.process.poll() is not None, "stop or kill the broker before restarting it"
        return await BrokerProcess.start(
            self.data_dir,
            work_dir=self.work_dir,
            args=self.args,
            env=self.env,
            timeout_s=timeout_s,
            registry=self.registry,
        )

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process.poll() is None

    def output(self) -> str:
        """Everything the broker printed (stdout and stderr)."""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def output_tail(self) -> str:
        """The last few kilobytes of its output."""
        return self.output()[-_OUTPUT_TAIL_BYTES:]

    async def wait_exited(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait until the process ends; return its exit status.

        Raises:
            BrokerProcessError: It is still running after ``timeout_s``.
        """
        try:
            await wait_for(
                lambda: self.process.poll() is not None,
                timeout_s,
                interval_s=_POLL_INTERVAL_S,
                message="broker exit",
            )
        except WaitTimeoutError:
            raise BrokerProcessError(
                f"the broker did not exit within {timeout_s:g}s:\n{self.output_tail()}"
            ) from None
        return self.process.returncode

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Shut the broker down with SIGTERM and return its exit status (0 when graceful).

        If it does not exit within ``timeout_s`` it is killed and
        :class:`BrokerProcessError` is raised.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exited(timeout_s)
        except BrokerProcessError:
            self.kill()
            raise

    def kill(self) -> None:
        """Kill the broker with SIGKILL (no shutdown at all) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # pragma: no cover -- the kernel is stuck
            raise BrokerProcessError(f"pid {self.pid} survived SIGKILL") from None


async def stop_all(brokers: Sequence[BrokerProcess]) -> None:
    """Stop every broker still running (fixture teardown); kill those that hang."""
    for broker in brokers:
        if broker.running:
            try:
                await broker.stop()
            except BrokerProcessError:
                broker.kill()


def broker_command(data_dir: Path, ready_file: Path, *args: str) -> list[str]:
    """The command line of a test broker: ``data_dir``, free ports, ``ready_file``, then ``args``.

    For tests that run the process themselves (to watch it fail at start-up, or to keep its
    stderr apart); :meth:`BrokerProcess.start` uses it too.
    """
    return [
        sys.executable,
        "-m",
        "flux_broker",
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--embedded-nats-port",
        "0",
        "--ready-file",
        str(ready_file),
        *args,
    ]


def _spawn(
    data_dir: Path, work_dir: Path, args: Sequence[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start ``python -m flux_broker``; return the process, its ready file and its log."""
    work_dir.mkdir(parents=True, exist_ok=True)
    serial = sum(1 for _ in work_dir.glob("broker-*.log"))
    ready_file = work_dir / f"broker-{serial}.ready.json"
    log_path = work_dir / f"broker-{serial}.log"
    command = broker_command(data_dir, ready_file, *args)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
    return process, ready_file, log_path


def _read_ready_file(path: Path) -> dict[str, str]:
    info = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(info, dict), info
    return {str(key): str(value) for key, value in info.items()}
