"""Throughput of a real broker's Liftbridge-compatible data paths against minimal baselines.

For each sync policy (``FLUX_STREAMS_SYNC_POLICY``; ``never`` and ``always`` by default) a real
``flux-broker`` process is started with its embedded NATS server
(:class:`flux_testing.broker.BrokerProcess`), and this process drives it as a client would,
with 128 B values (counts of the full run; ``--quick`` divides them by 5 to 10):

- **nats-ingest** (20,000 messages): one nats-py connection publishes Liftbridge envelopes
  (:func:`flux_broker.nats.envelope.encode_message`: ack policy LEADER, a correlation id and
  an ack inbox subscribed beforehand) straight to a stream's subject, keeping at most
  ``--window`` (1,000) messages unacked, until every ack has arrived and been decoded
  (:func:`~flux_broker.nats.envelope.decode_ack`);
- **publish-async** (10,000): PublishRequests (ack policy LEADER) on one ``PublishAsync``
  call over grpc.aio, with the same window, until every response has arrived;
- **subscribe** (10,000): a stream is filled through NATS (untimed), then ``Subscribe`` from
  EARLIEST with STOP_LATEST is read, handshake included, until it ends with RESOURCE_EXHAUSTED;
- **publish-unary** (1,000): ``Publish`` with a deadline (so each call waits for its ack), one
  call at a time; msgs/s and the p50/p99 latency of a call.

gRPC streams cost ~100 us per message on each side (DESIGN.md §5), hence the smaller counts.
Each run of a publish case uses a fresh stream.

The **baselines** do the same client work against servers that store nothing. They run in a
child process (this program with ``--baseline-server``), so that, like the broker, the server
has its own interpreter and core; it is started beside each broker, and every run of a case
against the broker follows a run against its baseline, so both see the same machine load:

- nats-ingest: a nats-py subscriber on ``bench.echo`` of the broker's NATS server that answers
  every message on its reply subject with an ack envelope captured from the broker (same size).
  The same publisher loop, window and payloads drive it;
- the gRPC cases: a minimal grpc.aio server of generic handlers, bytes in and out (no protobuf
  work on the server): a bidi-streaming echo answering each request with a ``PublishResponse``
  captured from the broker, a unary echo answering the same, and a server-streaming handler
  yielding an empty handshake and then copies of a ``Message`` captured from the broker's
  ``Subscribe``. The client serializes and parses the same protobuf types as with the broker.

Every case reports messages/s (the median of ``--repeat`` runs, default 3), its baseline's and
the ratio broker / baseline; the unary case adds p50/p99 call latency. A short warm-up runs on
each server first (it also captures the baselines' reply templates). This is a program, not a
test: it never fails on speed, only when something answers wrongly or not at all (every wait
is bounded).

The broker's data goes to a temporary directory (under ``--data-dir``); results are also
written as JSON (``--json``). Run it from the repository root::

    .venv/bin/python broker/bench/api_bench.py            # the full run (about 2 minutes)
    .venv/bin/python broker/bench/api_bench.py --quick    # a smoke run (about 15 s)
    nox -s bench -- --quick                               # after log_bench.py, through nox

``--only nats-ingest --policy never --messages 200000 --repeat 1`` runs one case longer, e.g.
for ``py-spy record --pid <broker pid>`` (the pids are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import signal
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
import nats
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from flux_broker.nats.envelope import decode_ack, encode_message
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    Stub: TypeAlias = api_pb2_grpc.APIAsyncStub

VALUE_BYTES: Final = 128
POOL: Final = 1024  # distinct random values cycled through
POLICIES: Final = ("never", "interval", "always")
DEFAULT_POLICIES: Final = ("never", "always")
CASES: Final = ("nats-ingest", "publish-async", "subscribe", "publish-unary")
LEADER: Final = api_pb2.AckPolicy.LEADER
ACK_OK: Final = api_pb2.Ack.Error.OK
#: Bound on one timed run (or one fill) of a case; a healthy full run needs a few seconds.
CASE_TIMEOUT_S: Final = 120.0
#: Deadline of each unary Publish (it waits for the ack until then) and of set-up RPCs.
CALL_TIMEOUT_S: Final = 10.0
#: Bound on the baseline server's start-up and shutdown.
SERVER_TIMEOUT_S: Final = 30.0
ECHO_SUBJECT: Final = "bench.echo"
ECHO_SERVICE: Final = "flux.bench.Echo"
FEED_COUNT: Final = struct.Struct(">I")  # the Feed request: this count, then the message
SCRIPT: Final = Path(__file__).resolve()
DEFAULT_JSON: Final = SCRIPT.parent / "results" / "api_bench.json"

PublishCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[api_pb2.PublishRequest, api_pb2.PublishResponse]"
)
PublishStream: TypeAlias = Callable[[AsyncIterator[api_pb2.PublishRequest]], PublishCall]
UnaryPublish: TypeAlias = Callable[[api_pb2.PublishRequest], Awaitable[api_pb2.PublishResponse]]
MessageStream: TypeAlias = "grpc.aio.UnaryStreamCall[Any, api_pb2.Message]"


class BenchError(RuntimeError):
    """Something answered wrongly or not at all: the run is invalid (never about speed)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How many messages each case sends.

    Attributes:
        messages: Messages of the nats-ingest case.
        streamed: Messages of the publish-async and subscribe cases (gRPC streams cost
            ~100 us per message on each side, so fewer than over NATS keep the run short).
        unary: Calls of the publish-unary case.
        warmup: Messages of each path's warm-up on each broker (and on the baseline server).
    """

    messages: int
    streamed: int
    unary: int
    warmup: int


FULL: Final = Plan(messages=20_000, streamed=10_000, unary=1_000, warmup=500)
QUICK: Final = Plan(messages=2_000, streamed=1_000, unary=200, warmup=100)


@dataclass(slots=True)
class Measurement:
    """What one timed run did: messages, seconds and, for unary calls, each call's latency."""

    messages: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds

    def percentile_ms(self, fraction: float) -> float | None:
        """The latency below which ``fraction`` of the calls fall (nearest rank), in ms."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        rank = max(0, math.ceil(fraction * len(ordered)) - 1)
        return ordered[rank] * 1e3


def median_run(runs: Sequence[Measurement]) -> Measurement:
    """The run of median throughput."""
    return sorted(runs, key=lambda m: m.rate)[len(runs) // 2]


@dataclass(slots=True)
class Result:
    """One case's runs under one sync policy, and its baseline's; the median runs count."""

    case: str
    policy: str
    runs: list[Measurement]  # against the broker
    baseline_runs: list[Measurement]  # against the baseline server, interleaved with ``runs``

    @property
    def case_id(self) -> str:
        """``<case>/<policy>``."""
        return f"{self.case}/{self.policy}"

    @property
    def measurement(self) -> Measurement:
        """The broker's run of median throughput."""
        return median_run(self.runs)

    @property
    def baseline(self) -> Measurement:
        """The baseline's run of median throughput."""
        return median_run(self.baseline_runs)

    @property
    def ratio(self) -> float:
        """Throughput relative to the baseline's (median runs)."""
        return self.measurement.rate / self.baseline.rate

    def to_json(self) -> dict[str, object]:
        """The JSON form."""
        m, b = self.measurement, self.baseline
        return {
            "case": self.case_id,
            "sync_policy": self.policy,
            "messages": m.messages,
            "seconds": m.seconds,
            "msgs_per_s": m.rate,
            "baseline_msgs_per_s": b.rate,
            "ratio_to_baseline": self.ratio,
            "p50_ms": m.percentile_ms(0.50),
            "p99_ms": m.percentile_ms(0.99),
            "baseline_p50_ms": b.percentile_ms(0.50),
            "baseline_p99_ms": b.percentile_ms(0.99),
            "runs_msgs_per_s": [run.rate for run in self.runs],
            "baseline_runs_msgs_per_s": [run.rate for run in self.baseline_runs],
        }


@dataclass(frozen=True, slots=True)
class Templates:
    """Replies captured from the broker, so the baselines send messages of the same size."""

    ack_envelope: bytes  # a NATS ack (type-1 envelope) of the nats-ingest path
    publish_response: bytes  # a serialized PublishResponse with its ack
    message: bytes  # a serialized Message as Subscribe sends it (stored through NATS)


def say(line: str = "") -> None:
    """Print a line at once (progress goes to stdout with the results)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _identity(data: bytes) -> bytes:
    return data


def _serialize_request(request: api_pb2.PublishRequest) -> bytes:
    return request.SerializeToString()


# -- the drivers: the same client loop against the broker and its baseline ---------------------


def build_values() -> list[bytes]:
    """Random 128 B values, cycled through by every case."""
    return [os.urandom(VALUE_BYTES) for _ in range(POOL)]


def build_envelopes(values: Sequence[bytes], count: int, ack_inbox: str) -> list[bytes]:
    """``count`` PUBLISH envelopes (policy LEADER, correlation id ``i``) acked to ``ack_inbox``."""
    return [
        encode_message(
            api_pb2.Message(
                value=values[i % POOL], ackInbox=ack_inbox, correlationId=str(i), ackPolicy=LEADER
            )
        )
        for i in range(count)
    ]


def build_requests(
    values: Sequence[bytes], count: int, stream: str
) -> list[api_pb2.PublishRequest]:
    """``count`` PublishRequests to ``stream`` (policy LEADER, correlation id ``i``)."""
    return [
        api_pb2.PublishRequest(
            stream=stream, value=values[i % POOL], correlationId=str(i), ackPolicy=LEADER
        )
        for i in range(count)
    ]


async def drive_nats(
    nc: Nats, subject: str, payloads: Sequence[bytes], ack_inbox: str, window: int, *, reply: str
) -> Measurement:
    """Publish ``payloads`` to ``subject``, at most ``window`` unacked, until every ack is in.

    Acks arrive on ``ack_inbox`` (subscribed before the first publish) and are decoded.
    ``reply`` is the NATS reply subject of each publish: empty for the broker (the inbox is in
    the envelope), the inbox for the echo baseline.
    """
    count = len(payloads)
    slots = asyncio.Semaphore(window)
    done = asyncio.Event()
    received = 0
    failed = 0

    async def on_ack(msg: Msg) -> None:
        nonlocal received, failed
        if decode_ack(msg.data).ackError != ACK_OK:
            failed += 1
        received += 1
        slots.release()
        if received == count:
            done.set()

    subscription = await nc.subscribe(ack_inbox, cb=on_ack, pending_msgs_limit=4 * window)
    try:
        await nc.flush(timeout=int(CALL_TIMEOUT_S))  # the server has the subscription
        gc.collect()
        start = time.perf_counter()
        async with asyncio.timeout(CASE_TIMEOUT_S):
            for payload in payloads:
                await slots.acquire()
                await nc.publish(subject, payload, reply=reply)
            await nc.flush(timeout=int(CASE_TIMEOUT_S))
            await done.wait()
        seconds = time.perf_counter() - start
    finally:
        await subscription.unsubscribe()
    if failed:
        raise BenchError(f"{failed} of {count} acks on {subject} carried an error")
    return Measurement(count, seconds)


async def drive_publish_stream(
    open_call: PublishStream, requests: Sequence[api_pb2.PublishRequest], window: int
) -> Measurement:
    """Send ``requests`` on one bidi call, at most ``window`` unanswered, until all answered."""
    count = len(requests)
    slots = asyncio.Semaphore(window)

    async def send() -> AsyncIterator[api_pb2.PublishRequest]:
        for request in requests:
            await slots.acquire()
            yield request

    received = 0
    failed = 0
    seconds = 0.0
    gc.collect()
    start = time.perf_counter()
    async with asyncio.timeout(CASE_TIMEOUT_S):
        call = open_call(send())
        async for response in call:
            if response.HasField("asyncError") or response.ack.ackError != ACK_OK:
                failed += 1
            received += 1
            slots.release()
            if received == count:
                seconds = time.perf_counter() - start
        code = await call.code()
    if code is not grpc.StatusCode.OK or received != count or failed:
        raise BenchError(
            f"PublishAsync ended {code.name} after {received} of {count} responses, "
            f"{failed} of them errors"
        )
    return Measurement(count, seconds)


async def drive_unary(
    publish: UnaryPublish, requests: Sequence[api_pb2.PublishRequest]
) -> Measurement:
    """Send ``requests`` one at a time, each waiting for its response; time every call."""
    latencies: list[float] = []
    clock = time.perf_counter
    gc.collect()
    start = clock()
    async with asyncio.timeout(CASE_TIMEOUT_S):
        for request in requests:
            sent = clock()
            response = await publish(request)
            latencies.append(clock() - sent)
            if response.ack.ackError != ACK_OK or response.ack.correlationId == "":
                raise BenchError(f"Publish was answered without a good ack: {response}")
    return Measurement(len(requests), clock() - start, latencies)


async def drive_subscription(open_call: Callable[[], MessageStream], expected: int) -> Measurement:
    """Read a server stream to its end: a handshake, then ``expected`` messages.

    The broker's Subscribe ends with RESOURCE_EXHAUSTED (STOP_LATEST reached), the baseline's
    with OK; anything else, or another count, is an error.
    """
    received = -1  # the first message is the empty handshake
    gc.collect()
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    async with asyncio.timeout(CASE_TIMEOUT_S):
        try:
            async for message in open_call():
                if received >= 0 and len(message.value) != VALUE_BYTES:
                    raise BenchError(f"message {received} has a {len(message.value)} B value")
                received += 1
        except grpc.aio.AioRpcError as error:
            code = error.code()
    seconds = time.perf_counter() - start
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED) or received != expected:
        raise BenchError(f"the subscription ended {code.name} after {received} of {expected}")
    return Measurement(received, seconds)


# -- the broker ---------------------------------------------------------------------------------


@dataclass(slots=True)
class BrokerClients:
    """One broker and this process's connections to it."""

    broker: BrokerProcess
    policy: str
    api: Stub
    nc: Nats
    ack_inbox: str
    values: list[bytes]
    streams: int = 0

    async def create_stream(self, case: str) -> tuple[str, str]:
        """A fresh one-partition stream for one run; its name and subject."""
        self.streams += 1
        name = f"{case}-{self.streams}"
        subject = f"bench.{name}"
        await self.api.CreateStream(
            api_pb2.CreateStreamRequest(name=name, subject=subject, partitions=1),
            timeout=CALL_TIMEOUT_S,
        )
        return name, subject

    async def ingest(self, count: int, window: int) -> tuple[str, Measurement]:
        """Publish ``count`` envelopes to a fresh stream through NATS; its name and the timing."""
        name, subject = await self.create_stream("ingest")
        payloads = build_envelopes(self.values, count, self.ack_inbox)
        return name, await drive_nats(self.nc, subject, payloads, self.ack_inbox, window, reply="")

    async def publish_async(self, count: int, window: int) -> Measurement:
        """PublishAsync ``count`` requests to a fresh stream."""
        name, _subject = await self.create_stream("async")
        requests = build_requests(self.values, count, name)
        return await drive_publish_stream(
            lambda it: self.api.PublishAsync(it, timeout=CASE_TIMEOUT_S), requests, window
        )

    async def publish_unary(self, count: int) -> Measurement:
        """Publish ``count`` requests to a fresh stream, one at a time, each with a deadline."""
        name, _subject = await self.create_stream("unary")
        requests = build_requests(self.values, count, name)
        return await drive_unary(lambda r: self.api.Publish(r, timeout=CALL_TIMEOUT_S), requests)

    async def subscribe(self, stream: str, count: int) -> Measurement:
        """Subscribe to ``stream`` (holding ``count`` messages) from EARLIEST to STOP_LATEST."""
        request = api_pb2.SubscribeRequest(
            stream=stream, startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST
        )
        return await drive_subscription(
            lambda: self.api.Subscribe(request, timeout=CASE_TIMEOUT_S), count
        )

    async def capture_templates(self) -> Templates:
        """One message through each path, keeping the broker's replies for the baselines."""
        name, subject = await self.create_stream("template")
        inbox = self.nc.new_inbox()
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_ack(msg: Msg) -> None:
            if not got.done():
                got.set_result(msg.data)

        subscription = await self.nc.subscribe(inbox, cb=on_ack)
        try:
            await self.nc.flush()
            message = api_pb2.Message(
                value=self.values[0], ackInbox=inbox, correlationId="9999", ackPolicy=LEADER
            )  # a typical correlation id: 4 digits
            await self.nc.publish(subject, encode_message(message))
            async with asyncio.timeout(CALL_TIMEOUT_S):
                ack_envelope = await got
        finally:
            await subscription.unsubscribe()
        publish = api_pb2.PublishRequest(
            stream=name, value=self.values[0], correlationId="9999", ackPolicy=LEADER
        )
        response = await self.api.Publish(publish, timeout=CALL_TIMEOUT_S)
        request = api_pb2.SubscribeRequest(
            stream=name, startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST
        )
        call = self.api.Subscribe(request, timeout=CALL_TIMEOUT_S)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await call.read()  # the handshake
            first = await call.read()
        call.cancel()
        if not isinstance(first, api_pb2.Message) or len(first.value) != VALUE_BYTES:
            raise BenchError(f"Subscribe did not deliver the message first: {first!r}")
        return Templates(ack_envelope, response.SerializeToString(), first.SerializeToString())


@contextlib.asynccontextmanager
async def running_broker(
    root: Path, policy: str, values: list[bytes]
) -> AsyncIterator[BrokerClients]:
    """A broker with the sync policy ``policy`` and connections to it; stopped afterwards."""
    broker = await BrokerProcess.start(
        root / f"data-{policy}",
        work_dir=root / f"run-{policy}",
        env={"FLUX_STREAMS_SYNC_POLICY": policy},
    )
    try:
        nc = await nats.connect(broker.nats_url, allow_reconnect=False)
        try:
            async with grpc.aio.insecure_channel(broker.address) as channel:
                yield BrokerClients(
                    broker, policy, api_pb2_grpc.APIStub(channel), nc, nc.new_inbox(), values
                )
        finally:
            await nc.close()
    finally:
        await broker.stop()


# -- the baseline server (a child process) -----------------------------------------------------


async def serve_baselines(nats_url: str, ack_envelope: bytes, publish_response: bytes) -> None:
    """The child process: a NATS echo and a minimal gRPC server until SIGTERM.

    Prints one JSON line with the gRPC address when both serve.
    """
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nc = await nats.connect(nats_url, allow_reconnect=False)

    async def echo(msg: Msg) -> None:
        await nc.publish(msg.reply, ack_envelope)

    await nc.subscribe(ECHO_SUBJECT, cb=echo, pending_msgs_limit=1 << 20)
    await nc.flush()

    async def publish_stream(
        requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for _request in requests:
            yield publish_response

    async def publish_unary(
        _request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        return publish_response

    async def feed(
        request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        (count,) = FEED_COUNT.unpack_from(request)
        message = request[FEED_COUNT.size :]
        yield b""  # an empty Message: the handshake, as the broker sends it
        for _ in range(count):
            yield message

    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "PublishStream": grpc.stream_stream_rpc_method_handler(publish_stream),
            "Publish": grpc.unary_unary_rpc_method_handler(publish_unary),
            "Feed": grpc.unary_stream_rpc_method_handler(feed),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    say(json.dumps({"grpc": f"127.0.0.1:{port}"}))
    await stop.wait()
    await server.stop(1.0)
    await nc.close()


@dataclass(slots=True)
class BaselineClients:
    """The baseline server process and this process's connections to it."""

    process: asyncio.subprocess.Process
    channel: grpc.aio.Channel
    nc: Nats
    ack_inbox: str
    values: list[bytes]
    message: bytes

    async def ingest(self, count: int, window: int) -> Measurement:
        """The nats-ingest loop against the echo subscriber."""
        payloads = build_envelopes(self.values, count, self.ack_inbox)
        return await drive_nats(
            self.nc, ECHO_SUBJECT, payloads, self.ack_inbox, window, reply=self.ack_inbox
        )

    async def publish_async(self, count: int, window: int) -> Measurement:
        """The publish-async loop against the bidi echo."""
        method = self.channel.stream_stream(
            f"/{ECHO_SERVICE}/PublishStream",
            request_serializer=_serialize_request,
            response_deserializer=api_pb2.PublishResponse.FromString,
        )
        requests = build_requests(self.values, count, "async-0")
        return await drive_publish_stream(
            lambda it: method(it, timeout=CASE_TIMEOUT_S), requests, window
        )

    async def publish_unary(self, count: int) -> Measurement:
        """The publish-unary loop against the unary echo."""
        method = self.channel.unary_unary(
            f"/{ECHO_SERVICE}/Publish",
            request_serializer=_serialize_request,
            response_deserializer=api_pb2.PublishResponse.FromString,
        )
        requests = build_requests(self.values, count, "unary-0")
        return await drive_unary(lambda r: method(r, timeout=CALL_TIMEOUT_S), requests)

    async def subscribe(self, count: int) -> Measurement:
        """The subscribe loop against the feed of ``count`` captured messages."""
        method = self.channel.unary_stream(
            f"/{ECHO_SERVICE}/Feed",
            request_serializer=_identity,
            response_deserializer=api_pb2.Message.FromString,
        )
        request = FEED_COUNT.pack(count) + self.message
        return await drive_subscription(lambda: method(request, timeout=CASE_TIMEOUT_S), count)


@contextlib.asynccontextmanager
async def running_baselines(
    nats_url: str, templates: Templates, values: list[bytes]
) -> AsyncIterator[BaselineClients]:
    """Start the baseline server process on ``nats_url``, connect, and stop it afterwards."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--baseline-server",
        nats_url,
        "--ack-hex",
        templates.ack_envelope.hex(),
        "--response-hex",
        templates.publish_response.hex(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(SERVER_TIMEOUT_S):
            line = await process.stdout.readline()
        if not line:
            raise BenchError(f"the baseline server exited with status {await process.wait()}")
        address = str(json.loads(line)["grpc"])
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                yield BaselineClients(
                    process, channel, nc, nc.new_inbox(), values, templates.message
                )
        finally:
            await nc.close()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(SERVER_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


# -- running ------------------------------------------------------------------------------------


LABELS: Final = {
    "nats-ingest": "NATS ingest, acked",
    "publish-async": "gRPC PublishAsync",
    "subscribe": "gRPC Subscribe",
    "publish-unary": "gRPC Publish (unary)",
}

Run: TypeAlias = Callable[[], Awaitable[Measurement]]


def describe(m: Measurement) -> str:
    """One run, as printed."""
    line = f"{m.messages:,} in {m.seconds:.2f} s: {m.rate:>7,.0f} msgs/s"
    p50, p99 = m.percentile_ms(0.50), m.percentile_ms(0.99)
    if p50 is not None and p99 is not None:
        line += f" (p50 {p50:.2f} ms, p99 {p99:.2f} ms)"
    return line


async def warm_up(clients: BrokerClients | BaselineClients, plan: Plan, window: int) -> None:
    """A short pass over every path (connections, code paths and caches get warm)."""
    n = plan.warmup
    if isinstance(clients, BrokerClients):
        stream, _m = await clients.ingest(n, window)
        await clients.subscribe(stream, n)
    else:
        await clients.ingest(n, window)
        await clients.subscribe(n)
    await clients.publish_async(n, window)
    await clients.publish_unary(max(1, n // 10))


async def run_cases(
    broker: BrokerClients, base: BaselineClients, plan: Plan, args: argparse.Namespace
) -> list[Result]:
    """Every selected case, each run against the baseline and then against the broker."""
    window = args.window
    n, streamed, unary = plan.messages, plan.streamed, plan.unary
    filled = ""
    if "subscribe" in args.only:
        filled, _m = await broker.ingest(streamed, window)  # untimed: the stream to read

    async def ingest() -> Measurement:
        return (await broker.ingest(n, window))[1]

    runs: dict[str, tuple[Run, Run]] = {
        "nats-ingest": (lambda: base.ingest(n, window), ingest),
        "publish-async": (
            lambda: base.publish_async(streamed, window),
            lambda: broker.publish_async(streamed, window),
        ),
        "subscribe": (lambda: base.subscribe(streamed), lambda: broker.subscribe(filled, streamed)),
        "publish-unary": (lambda: base.publish_unary(unary), lambda: broker.publish_unary(unary)),
    }
    results = []
    for case in args.only:
        result = Result(case, broker.policy, [], [])
        run_baseline, run_broker = runs[case]
        say(f"  {LABELS[case]}, sync {broker.policy}")
        for _ in range(args.repeat):
            result.baseline_runs.append(await run_baseline())
            result.runs.append(await run_broker())
            say(f"    baseline {describe(result.baseline_runs[-1])}")
            say(f"    broker   {describe(result.runs[-1])}")
        results.append(result)
    return results


async def run_all(args: argparse.Namespace, plan: Plan) -> list[Result]:
    """For each sync policy: a broker, a baseline server on its NATS server, every case."""
    values = build_values()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="flux-api-bench-", dir=args.data_dir) as tmp:
        root = Path(tmp)
        say(f"data in {tmp}")
        for policy in args.policy:
            async with running_broker(root, policy, values) as broker:
                await warm_up(broker, plan, args.window)
                templates = await broker.capture_templates()
                async with running_baselines(broker.broker.nats_url, templates, values) as base:
                    say(
                        f"sync policy {policy}: broker pid {broker.broker.pid}, "
                        f"baseline server pid {base.process.pid} (on the broker's NATS server)"
                    )
                    await warm_up(base, plan, args.window)
                    results += await run_cases(broker, base, plan, args)
    return results


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def report(results: list[Result], plan: Plan, window: int) -> list[str]:
    """The results table, as lines."""
    lines = [
        "",
        f"Results: {VALUE_BYTES} B values; messages per run: {plan.messages:,} over NATS, "
        f"{plan.streamed:,} over gRPC streams, {plan.unary:,} unary calls; window {window:,}; "
        "median run; ratio = broker / baseline; p50/p99 = latency of one unary call",
    ]
    header = (
        f"{'case':<22} {'sync':<8} {'msgs/s':>9} {'baseline':>9} {'ratio':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'base p50':>8} {'base p99':>8}"
    )
    lines += [header, "-" * len(header)]
    for r in results:
        m, base = r.measurement, r.baseline
        cells = [
            f"{LABELS[r.case]:<22}",
            f"{r.policy:<8}",
            f"{m.rate:>9,.0f}",
            f"{base.rate:>9,.0f}",
            f"{r.ratio:>5.2f}x",
            f"{_ms(m.percentile_ms(0.50)):>7}",
            f"{_ms(m.percentile_ms(0.99)):>7}",
            f"{_ms(base.percentile_ms(0.50)):>8}",
            f"{_ms(base.percentile_ms(0.99)):>8}",
        ]
        lines.append(" ".join(cells).rstrip())
    return lines


def write_json(path: Path, args: argparse.Namespace, plan: Plan, results: list[Result]) -> None:
    """Write the results and the run's context as JSON."""
    document = {
        "benchmark": "api_bench",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
        },
        "plan": {
            "quick": args.quick,
            "messages": plan.messages,
            "streamed": plan.streamed,
            "unary": plan.unary,
            "warmup": plan.warmup,
            "value_bytes": VALUE_BYTES,
            "window": args.window,
            "repeat": args.repeat,
            "policies": args.policy,
            "cases": args.only,
        },
        "results": [r.to_json() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="api_bench.py",
        description="Throughput of a real broker's Liftbridge-compatible data paths (NATS "
        "ingest, PublishAsync, Subscribe, unary Publish) under each sync policy, against "
        "minimal NATS and gRPC servers measured in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: a smoke run of some seconds"
    )
    parser.add_argument(
        "--messages",
        type=int,
        metavar="N",
        help=f"messages per run of nats-ingest (default {FULL.messages:,}; "
        f"{QUICK.messages:,} with --quick)",
    )
    parser.add_argument(
        "--streamed",
        type=int,
        metavar="N",
        help=f"messages per run of publish-async and subscribe (default {FULL.streamed:,}; "
        f"{QUICK.streamed:,} with --quick)",
    )
    parser.add_argument(
        "--unary",
        type=int,
        metavar="N",
        help=f"calls per run of the unary case (default {FULL.unary:,}; {QUICK.unary:,} with "
        "--quick)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1000,
        metavar="W",
        help="most unacked messages of nats-ingest and publish-async (default 1,000)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="R",
        help="runs of each case; the median counts (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        choices=POLICIES,
        help="broker sync policy; repeat for several (default: never and always)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=CASES,
        help="run only this case (repeatable; default: all)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the results as JSON (default broker/bench/results/api_bench.json)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="parent of the temporary data directory (default: the system temporary directory)",
    )
    # The baseline server's own mode (this program, started by itself).
    parser.add_argument("--baseline-server", metavar="NATS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--ack-hex", default="", help=argparse.SUPPRESS)
    parser.add_argument("--response-hex", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("messages", "streamed", "unary", "window", "repeat"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.policy = list(dict.fromkeys(args.policy or DEFAULT_POLICIES))
    args.only = [case for case in CASES if case in (args.only or CASES)]
    return args


def choose_plan(args: argparse.Namespace) -> Plan:
    """The counts for the arguments."""
    plan = QUICK if args.quick else FULL
    return Plan(
        messages=args.messages or plan.messages,
        streamed=args.streamed or plan.streamed,
        unary=args.unary or plan.unary,
        warmup=plan.warmup,
    )


async def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print and write its results (or serve the baselines)."""
    args = parse_args(argv)
    if args.baseline_server:
        await serve_baselines(
            args.baseline_server, bytes.fromhex(args.ack_hex), bytes.fromhex(args.response_hex)
        )
        return
    plan = choose_plan(args)
    started = time.perf_counter()
    say(
        f"api_bench: Python {sys.version.split()[0]}, grpcio {grpc.__version__}, "
        f"{os.cpu_count()} CPUs; {plan.messages:,} messages per run over NATS, "
        f"{plan.streamed:,} over gRPC streams, {plan.unary:,} unary calls; "
        f"{VALUE_BYTES} B values, window {args.window:,}; median of {args.repeat} run(s); "
        f"sync policies {', '.join(args.policy)}"
    )
    results = await run_all(args, plan)
    for line in report(results, plan, args.window):
        say(line)
    write_json(args.json, args, plan, results)
    say("")
    say(f"JSON written to {args.json}; total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
