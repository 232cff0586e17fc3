"""Flux's data paths against NATS JetStream, and the Python SDK against the raw RPCs (issue 8).

One run starts, per pass, a real Flux broker (:class:`flux_testing.broker.BrokerProcess`, with
its embedded NATS server) and a ``nats-server -js`` (:class:`jetstream_baseline.JetStreamServer`,
file store, one replica) side by side, and measures each row with 128 B and 1 KiB records,
JetStream first and Flux right after it, so both see the same machine load:

1. **acked** -- acked publish, one record per NATS message, 256 in flight. Flux: Liftbridge
   envelopes (ack policy LEADER, an ack inbox subscribed beforehand) published by nats-py
   straight to the stream's subject on the broker's NATS server, each ack decoded. JetStream:
   scenario ``acked-256`` of the baseline.
2. **batched** -- acked publish through Flux's batched path: batches framed once in the log's
   record format (:func:`flux_broker.log.format.frame`) and sent again and again on one
   ``PublishBatch`` call (ack policy LEADER) with a window of batches in flight; each response
   must carry the next offsets. Several batch sizes and windows are tried; the best counts.
   JetStream: scenario ``async`` (its best publish rate).
3. **consume** -- catch-up consume: a stream is filled through ``PublishBatch`` (untimed) with
   as many records as JetStream's consume scenario stores (1,000,000 of 128 B in the full
   run), then ``SubscribeBatch`` from EARLIEST to STOP_LATEST is read until the call ends OK.
   Every batch must continue the offsets of the one before, hold exactly ``recordCount``
   records of the expected size, and the total must be the stored count. JetStream: scenario
   ``consume`` (a pull consumer without acks).
4. **one-by-one** -- one record at a time, each waiting for its ack: p50/p99 of one publish.
   Flux: the NATS envelope path of row 1. JetStream: scenario ``one-by-one``.
5. **durable** -- row 2 again on a second pair of servers whose stores sync every write
   before acking it: Flux with ``streams.sync.policy: always``, JetStream with
   ``sync_interval: always`` (its ``async`` scenario).

6. **sdk-publish** -- ``flux_client``'s ``Producer.send_batch`` against the raw ``PublishBatch``
   call doing the same client work: its batches are framed from the values, batch by batch, with
   :func:`flux_client._records.encode_record` (row 2 frames its batches once and resends them,
   so it leaves the framing out). The SDK runs with 1, 4 and 8 tasks each calling
   ``send_batch`` with thousands of records (idempotent, ack LEADER); the best counts. Row 2's
   way is measured again beside them, for information.
7. **sdk-consume** -- ``client.subscribe(stream, 0, start=Start.EARLIEST, stop=Stop.LATEST)``
   against the raw ``SubscribeBatch`` call that also decodes every batch with
   :func:`flux_client._records.decode_records` (row 3 does not decode). Both check every
   record's offset, one record at a time. One stream as large as row 3's is filled once
   (untimed) and read by each; row 3's way is measured again beside them, for information.

Rows 6 and 7 have no JetStream side: their baseline is the raw call, and their target is the
issue's "the SDK loses at most 20 %" (ratio ≥ 0.8, at both record sizes).

Rows 1-4, 6 and 7 run on a broker with ``streams.sync.policy: never`` and JetStream's default (a
2-minute sync interval): an ack means written, not synced, on both. Every timed run stops at a
time cap (``max_seconds`` of the plan; what was acked until then counts) and every wait is
bounded. Each Flux publish run uses a fresh stream, deleted afterwards, whose newest offset is
checked against the acks.

The program prints progress, then one table for rows 1-5: per row and size the best Flux figure
and how it was reached, the best JetStream figure of ``nats bench`` (natscli, see
:func:`jetstream_baseline.install_natscli`) and of nats-py, the ratio of Flux to the better of
the two (for latency, JetStream's p50 over Flux's: above 1 always means Flux is ahead), and
the issue's target for 128 B records. A second table gives rows 6 and 7: the SDK's best
figure, the raw same-work baseline's, their ratio, and row 2's or 3's way for information. It
ends with the peak RSS (``VmHWM``) of each server
process. The results go to ``broker/bench/results/data_path_bench.json`` and a chart to
``data_path_bench.png`` beside it (``results/quick/`` for ``--quick`` runs, which are not
committed). Run it from the repository root::

    .venv/bin/python broker/bench/data_path_bench.py --quick   # a smoke run, about 40 s
    .venv/bin/python broker/bench/data_path_bench.py           # the full run, about 5 minutes
    nox -s bench -- --quick                                    # with the other benchmarks

It never fails because something is slow, only when something answers wrongly or not at all;
a failed measurement is a row marked FAILED and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

import grpc
import jetstream_baseline as jb
import nats
import nats.errors
from jetstream_baseline import BenchError, Case, Result, say
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

import flux_client
from flux_broker.log.format import HEADER, NewRecord, Placement, frame
from flux_broker.nats.envelope import EnvelopeError, decode_ack, encode_message
from flux_client import FluxError, RecordMetadata, Start, Stop
from flux_client._records import decode_records, encode_record
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess

if TYPE_CHECKING:  # the async stub exists only in the type stubs; matplotlib only for charts
    from matplotlib.axes import Axes

    Stub: TypeAlias = api_pb2_grpc.APIAsyncStub

SIZES: Final = jb.SIZES
FLUX: Final = "flux"
SDK: Final = "flux_client"  # the tool of rows 6 and 7's SDK measurements
LEADER: Final = api_pb2.AckPolicy.LEADER
ACK_OK: Final = api_pb2.Ack.Error.OK
ACKED_WINDOW: Final = jb.ACKED_WINDOW  # row 1: records in flight, as JetStream's acked-256
POOL: Final = 1024  # distinct envelopes cycled through by the NATS rows (correlation ids)
#: Batches of the untimed fill of row 3: about 1 MB each.
FILL_BATCH_BYTES: Final = 1_000_000
FILL_WINDOW: Final = 8
#: Limits given to ``frame``: far above any batch here; the broker checks its own.
FRAME_MAX_BYTES: Final = 64 * 2**20
#: ``maxBytes`` of the SubscribeBatch runs of row 3: 1 MiB, and 0 (the broker's 64 KiB).
SUBSCRIBE_MAX_BYTES: Final = (2**20, 0)
#: Deadline of one set-up RPC (create, delete, metadata).
CALL_TIMEOUT_S: Final = 10.0
#: How long acks, or the end of a call, may still take after a run's time cap.
DRAIN_TIMEOUT_S: Final = 30.0
SCRIPT: Final = Path(__file__).resolve()
RESULTS_DIR: Final = SCRIPT.parent / "results"
QUICK_RESULTS_DIR: Final = RESULTS_DIR / "quick"  # ignored by git: smoke runs
JSON_NAME: Final = "data_path_bench.json"
PNG_NAME: Final = "data_path_bench.png"
MARKDOWN_NAME: Final = "data_path_bench.md"  # the table, included by docs/benchmarks.md
PROGRAM: Final = "data_path_bench"

PublishBatchCall: TypeAlias = "grpc.aio.StreamStreamCall[bytes, api_pb2.PublishBatchResponse]"
PublishBatchMethod: TypeAlias = Callable[..., PublishBatchCall]


# -- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A target of the issue: bounds on Flux's figures, each checked when set.

    Attributes:
        text: How it is printed.
        min_ratio: Least ratio to the best JetStream figure.
        ahead: The ratio must exceed 1 (Flux ahead of JetStream).
        min_rate: Least records/s.
        max_p50_us: Greatest p50 latency in microseconds.
    """

    text: str
    min_ratio: float = 0.0
    ahead: bool = False
    min_rate: float = 0.0
    max_p50_us: float = math.inf

    def met(self, ratio: float | None, rate: float, p50_us: float | None) -> bool:
        """Whether figures ``ratio`` (``None``: no ratio), ``rate`` and ``p50_us`` meet it."""
        wants_ratio = self.min_ratio > 0 or self.ahead
        if wants_ratio and (
            ratio is None or ratio < self.min_ratio or (self.ahead and ratio <= 1.0)
        ):
            return False
        if math.isfinite(self.max_p50_us) and (p50_us is None or p50_us > self.max_p50_us):
            return False
        return rate >= self.min_rate


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One row of the issue's table.

    Attributes:
        number: The issue's number for it (1-5).
        key: Its name on the command line (``--only``) and the Flux results' scenario.
        title: What it measures, as printed.
        jetstream: The :mod:`jetstream_baseline` scenario it is compared with (``""`` for the
            SDK rows, whose baseline is the raw call).
        durable: Whether it runs on the servers that sync every write.
        latency: Whether it compares p50 latency rather than records/s.
        target: The issue's target for 128 B records (the SDK rows: at every size).
        sdk: An SDK row (6, 7): ``flux_client`` against the raw RPC doing the same work.
    """

    number: int
    key: str
    title: str
    jetstream: str
    durable: bool = False
    latency: bool = False
    target: Target | None = None
    sdk: bool = False


TARGET_SIZE: Final = 128  # the targets are for 128 B records
ROWS: Final = (
    RowSpec(
        1, "acked", "acked publish, 256 in flight", "acked-256",
        target=Target("≥ 0.7x", min_ratio=0.7),
    ),
    RowSpec(
        2, "batched", "batched publish vs async", "async", target=Target("≥ 5x", min_ratio=5.0)
    ),
    RowSpec(
        3, "consume", "catch-up consume", "consume",
        target=Target("≥ 2x, ≥ 1M/s", min_ratio=2.0, min_rate=1e6),
    ),
    RowSpec(
        4, "one-by-one", "one at a time (p50)", "one-by-one", latency=True,
        target=Target("p50 ≤ 400 µs", max_p50_us=400.0),
    ),
    RowSpec(
        5, "durable", "durable publish", "async", durable=True,
        target=Target("≥ 100k/s, > 1x", ahead=True, min_rate=1e5),
    ),
    RowSpec(
        6, "sdk-publish", "SDK send_batch vs raw", "", sdk=True,
        target=Target("≥ 0.8x raw", min_ratio=0.8),
    ),
    RowSpec(
        7, "sdk-consume", "SDK subscribe vs raw", "", sdk=True,
        target=Target("≥ 0.8x raw", min_ratio=0.8),
    ),
)  # fmt: skip
ROW_KEYS: Final = tuple(row.key for row in ROWS)


@dataclass(frozen=True, slots=True)
class BatchShape:
    """How a batched publish run sends: records per batch and batches in flight."""

    records: int
    window: int

    @property
    def variant(self) -> str:
        """``publish-batch-<records>x<window>``."""
        return f"publish-batch-{self.records}x{self.window}"


@dataclass(frozen=True, slots=True)
class SdkShape:
    """How an SDK publish run sends: records per ``send_batch`` call and tasks calling it."""

    records: int
    tasks: int

    @property
    def variant(self) -> str:
        """``send-batch-<records>x<tasks>``."""
        return f"send-batch-{self.records}x{self.tasks}"


@dataclass(frozen=True, slots=True)
class Plan:
    """How many records each run uses.

    Attributes:
        jetstream: The JetStream side's counts (its ``durable`` is row 5's).
        acked: Records of each Flux run of row 1.
        batched: Records of each Flux run of rows 2 and 5 (runs stop earlier at the cap).
        one_by_one: Publishes of each Flux run of row 4.
        shapes: Batch shapes tried in rows 2 and 5, by record size (and by row 6's raw runs).
        sdk_shapes: ``send_batch`` calls tried in row 6, by record size.
        warmup: Records of each path's warm-up on a new broker.
        max_seconds: Time cap of one timed run of either system (``nats bench`` is killed
            after 4x that, a fill after 4x that too).
    """

    jetstream: jb.Plan
    acked: int
    batched: int
    one_by_one: int
    shapes: dict[int, tuple[BatchShape, ...]]
    sdk_shapes: dict[int, tuple[SdkShape, ...]]
    warmup: int
    max_seconds: float

    def consume(self, size: int) -> int:
        """Records stored and read in row 3: as many as JetStream's consume scenario."""
        return self.jetstream.count("consume", size, durable=False)


#: Batch shapes tried in rows 2 and 5, the fastest reported: batches of ~170 KB to ~1.4 MB of
#: 128 B records, of ~1 MB and ~3 MB of 1 KiB ones (gRPC's default limit is 4 MiB a message).
SHAPES: Final[dict[int, tuple[BatchShape, ...]]] = {
    128: (BatchShape(1000, 8), BatchShape(4000, 4), BatchShape(8000, 4)),
    1024: (BatchShape(1000, 4), BatchShape(3000, 2)),
}
QUICK_SHAPES: Final[dict[int, tuple[BatchShape, ...]]] = {
    128: (BatchShape(4000, 4),),
    1024: (BatchShape(1000, 4),),
}
#: ``send_batch`` calls tried in row 6: 1, 4 and 8 tasks, each call about one default batch
#: (1 MiB) of 128 B records, or about five of 1 KiB ones.
SDK_SHAPES: Final[dict[int, tuple[SdkShape, ...]]] = {
    128: (SdkShape(6000, 1), SdkShape(6000, 4), SdkShape(6000, 8)),
    1024: (SdkShape(5000, 1), SdkShape(5000, 4), SdkShape(5000, 8)),
}
QUICK_SDK_SHAPES: Final[dict[int, tuple[SdkShape, ...]]] = {
    128: (SdkShape(6000, 1), SdkShape(6000, 4)),
    1024: (SdkShape(5000, 1), SdkShape(5000, 4)),
}
FULL: Final = Plan(
    jetstream=jb.Plan(
        acked=100_000, async_=200_000, consume=1_000_000, consume_large=250_000,
        one_by_one=5_000, durable=10_000, durable_one_by_one=0, max_seconds=6.0,
    ),
    acked=100_000, batched=2_000_000, one_by_one=5_000, shapes=SHAPES, sdk_shapes=SDK_SHAPES,
    warmup=2_000, max_seconds=6.0,
)  # fmt: skip
QUICK: Final = Plan(
    jetstream=jb.Plan(
        acked=10_000, async_=20_000, consume=100_000, consume_large=25_000,
        one_by_one=500, durable=2_000, durable_one_by_one=0, max_seconds=2.0,
    ),
    acked=10_000, batched=200_000, one_by_one=500,
    shapes=QUICK_SHAPES, sdk_shapes=QUICK_SDK_SHAPES, warmup=500, max_seconds=2.0,
)  # fmt: skip


# -- records and processes ----------------------------------------------------------------------


def framed_records(size: int, count: int) -> bytes:
    """``count`` records with random ``size``-byte values, framed as ``PublishBatch`` wants them.

    The header fields the broker stamps (offset, timestamp, epoch) are left at 0.
    """
    records = [NewRecord(value=os.urandom(size)) for _ in range(min(count, POOL))]
    records = [records[i % len(records)] for i in range(count)]
    data, _index = frame(records, Placement(0, 0, 0, 0, 0), FRAME_MAX_BYTES, FRAME_MAX_BYTES)
    return bytes(data)


def record_bytes(size: int) -> int:
    """Stored bytes of one record with a ``size``-byte value, no key, no headers."""
    return len(framed_records(size, 1))


def envelopes(size: int, ack_inbox: str, count: int) -> list[bytes]:
    """``count`` Liftbridge PUBLISH envelopes (ack policy LEADER) acked to ``ack_inbox``."""
    return [
        encode_message(
            api_pb2.Message(
                value=os.urandom(size), ackInbox=ack_inbox, correlationId=str(i), ackPolicy=LEADER
            )
        )
        for i in range(count)
    ]


def children_of(pid: int) -> list[tuple[int, str]]:
    """The processes whose parent is ``pid``: (pid, command name) pairs."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # it ended meanwhile
        name_end = text.rfind(")")
        fields = text[name_end + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append((int(text.split(" ", 1)[0]), text[text.find("(") + 1 : name_end]))
    return found


def _identity(data: bytes) -> bytes:
    return data


# -- the Flux broker ----------------------------------------------------------------------------


@dataclass(slots=True)
class FluxBroker:
    """One running broker and this process's connections to it.

    Attributes:
        process: The broker process.
        policy: Its ``streams.sync.policy``.
        api: A ``proto.API`` stub on its gRPC port.
        nc: A nats-py connection to its NATS server.
        publish_batch: ``PublishBatch`` sending requests serialized beforehand.
    """

    process: BrokerProcess
    policy: str
    api: Stub
    nc: Nats
    publish_batch: PublishBatchMethod
    streams: int = 0

    async def create_stream(self, label: str) -> tuple[str, str]:
        """A fresh one-partition stream; its name and subject."""
        self.streams += 1
        name = re.sub(r"[^a-z0-9-]", "-", f"{label}-{self.streams}")
        subject = f"bench.{name}"
        await self.api.CreateStream(
            api_pb2.CreateStreamRequest(name=name, subject=subject, partitions=1),
            timeout=CALL_TIMEOUT_S,
        )
        return name, subject

    async def delete_stream(self, name: str) -> None:
        """Delete stream ``name`` (a run's data never outlives it)."""
        await self.api.DeleteStream(api_pb2.DeleteStreamRequest(name=name), timeout=CALL_TIMEOUT_S)

    async def newest_offset(self, name: str) -> int:
        """The offset of the last record written to partition 0 of ``name`` (-1 if none)."""
        response = await self.api.FetchPartitionMetadata(
            api_pb2.FetchPartitionMetadataRequest(stream=name, partition=0),
            timeout=CALL_TIMEOUT_S,
        )
        return int(response.metadata.newestOffset)

    def peak_rss_bytes(self) -> dict[str, int | None]:
        """Peak RSS so far of the broker and of its embedded ``nats-server``, in bytes."""
        peaks: dict[str, int | None] = {"broker": jb.read_vm_hwm(self.process.pid)}
        for pid, name in children_of(self.process.pid):
            if name.startswith("nats-server"):
                peaks["embedded nats-server"] = jb.read_vm_hwm(pid)
        return peaks


@contextlib.asynccontextmanager
async def running_flux(root: Path, policy: str) -> AsyncIterator[FluxBroker]:
    """A broker with sync policy ``policy`` under ``root`` and connections; stopped afterwards."""
    process = await BrokerProcess.start(
        root / f"flux-{policy}",
        work_dir=root / f"flux-{policy}-run",
        env={"FLUX_STREAMS_SYNC_POLICY": policy},
    )
    try:
        nc = await nats.connect(process.nats_url, allow_reconnect=False, connect_timeout=5)
        try:
            async with grpc.aio.insecure_channel(process.address) as channel:
                method = channel.stream_stream(
                    "/proto.API/PublishBatch",
                    request_serializer=_identity,
                    response_deserializer=api_pb2.PublishBatchResponse.FromString,
                )
                yield FluxBroker(process, policy, api_pb2_grpc.APIStub(channel), nc, method)
        finally:
            await nc.close()
    finally:
        await process.stop()


async def guarded(run: Awaitable[Result]) -> Result:
    """``run``'s result; a gRPC, NATS or SDK error or a timeout becomes a :class:`BenchError`."""
    try:
        return await run
    except grpc.aio.AioRpcError as error:
        raise BenchError(f"{error.code().name}: {error.details()}") from error
    except (TimeoutError, nats.errors.Error, EnvelopeError, FluxError) as error:
        raise BenchError(f"{type(error).__name__}: {error}") from error


# -- Flux over NATS (rows 1 and 4) --------------------------------------------------------------


async def flux_nats_acked(
    broker: FluxBroker, case: Case, count: int, window: int, *, max_seconds: float
) -> Result:
    """Publish envelopes, at most ``window`` unacked, until ``count`` or the time cap; all acked.

    Every ack is decoded and must be OK; afterwards the partition's newest offset must be that
    of the last record sent.
    """
    name, subject = await broker.create_stream(f"{case.scenario}-{case.size}")
    nc = broker.nc
    inbox = nc.new_inbox()
    payloads = envelopes(case.size, inbox, min(count, POOL))
    slots = asyncio.Semaphore(window)
    acked = asyncio.Event()
    received = failed = sent = 0

    async def on_ack(msg: Msg) -> None:
        nonlocal received, failed
        if decode_ack(msg.data).ackError != ACK_OK:
            failed += 1
        received += 1
        slots.release()
        if received == sent:
            acked.set()

    subscription = await nc.subscribe(inbox, cb=on_ack, pending_msgs_limit=4 * window)
    try:
        await nc.flush(timeout=int(CALL_TIMEOUT_S))  # the server has the subscription
        clock = time.perf_counter
        gc.collect()
        start = clock()
        deadline = start + max_seconds
        async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
            while sent < count and (sent % 1024 or clock() < deadline):
                await slots.acquire()
                await nc.publish(subject, payloads[sent % POOL])
                sent += 1
            if received < sent:
                acked.clear()
                await acked.wait()
        seconds = clock() - start
        newest = await broker.newest_offset(name)
    finally:
        await subscription.unsubscribe()
        await broker.delete_stream(name)
    if failed or newest != sent - 1:
        raise BenchError(f"{failed} of {sent} acks were errors; newest offset {newest}")
    return case.result(
        FLUX, f"nats-ingest-{window}", sent, seconds,
        notes=f"Liftbridge envelopes on the stream subject, ack LEADER, at most {window} unacked",
    )  # fmt: skip


async def flux_nats_one_by_one(
    broker: FluxBroker, case: Case, count: int, *, max_seconds: float
) -> Result:
    """Publish envelopes one at a time, each waiting for its ack; p50/p99 of one publish."""
    name, subject = await broker.create_stream(f"{case.scenario}-{case.size}")
    nc = broker.nc
    inbox = nc.new_inbox()
    payloads = envelopes(case.size, inbox, min(count, POOL))
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bytes] = loop.create_future()

    async def on_ack(msg: Msg) -> None:
        if not waiter.done():
            waiter.set_result(msg.data)

    latencies: list[float] = []
    subscription = await nc.subscribe(inbox, cb=on_ack)
    try:
        await nc.flush(timeout=int(CALL_TIMEOUT_S))
        clock = time.perf_counter
        gc.collect()
        start = clock()
        deadline = start + max_seconds
        async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
            for i in range(count):
                if i % 64 == 0 and clock() > deadline:
                    break
                waiter = loop.create_future()
                sent = clock()
                await nc.publish(subject, payloads[i % POOL])
                ack = await waiter
                latencies.append(clock() - sent)
                if decode_ack(ack).ackError != ACK_OK:
                    raise BenchError(f"publish {i} to {name} was acked with an error")
        seconds = clock() - start
        newest = await broker.newest_offset(name)
    finally:
        await subscription.unsubscribe()
        await broker.delete_stream(name)
    if newest != len(latencies) - 1:
        raise BenchError(f"{len(latencies)} publishes acked, but the newest offset is {newest}")
    return case.result(
        FLUX, "nats-envelope", len(latencies), seconds,
        p50_us=jb.percentile_us(latencies, 0.50), p99_us=jb.percentile_us(latencies, 0.99),
        notes="one Liftbridge envelope at a time, each waiting for its ack on the inbox",
    )  # fmt: skip


# -- Flux's batched RPCs (rows 2, 3 and 5) ------------------------------------------------------


async def publish_batches(
    broker: FluxBroker,
    stream: str,
    size: int,
    count: int,
    shape: BatchShape,
    *,
    max_seconds: float,
    make_request: Callable[[int], bytes] | None = None,
) -> tuple[int, float]:
    """Publish ``count`` records to ``stream`` on one ``PublishBatch`` call, batched as ``shape``.

    The batches are framed and serialized once and sent again and again -- or, with
    ``make_request``, each request is made by ``make_request(records)`` when it is sent. At most
    ``shape.window`` are unanswered. Sending stops at ``count`` records or after
    ``max_seconds``. Each response must ack its whole batch at the next offsets.

    Returns:
        The records acked and the seconds from the call's start to its end.

    Raises:
        BenchError: A batch failed, was acked at unexpected offsets, or the call did not end OK.
        TimeoutError: Acks were still missing :data:`DRAIN_TIMEOUT_S` after the cap.
    """
    full, rest = divmod(count, shape.records)
    sizes = [shape.records] * full + ([rest] if rest else [])
    requests: dict[int, bytes] = (
        {}
        if make_request
        else {
            n: api_pb2.PublishBatchRequest(
                stream=stream, partition=0, records=framed_records(size, n), ackPolicy=LEADER
            ).SerializeToString()
            for n in set(sizes)
        }
    )
    slots = asyncio.Semaphore(shape.window)
    clock = time.perf_counter
    sent = 0
    deadline = math.inf

    async def batches() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < len(sizes):
            await slots.acquire()
            if sent and clock() > deadline:
                return
            sent += 1
            n = sizes[sent - 1]
            yield make_request(n) if make_request else requests[n]

    gc.collect()
    start = clock()
    deadline = start + max_seconds
    acked = answered = 0
    call = broker.publish_batch(batches(), timeout=max_seconds + DRAIN_TIMEOUT_S)
    try:
        async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
            async for response in call:
                expected = sizes[answered]
                if response.HasField("error"):
                    error = response.error
                    raise BenchError(f"batch {answered} failed: {error.reason}: {error.message}")
                if response.baseOffset != acked or response.recordCount != expected:
                    raise BenchError(
                        f"batch {answered} of {expected} records was acked at offset "
                        f"{response.baseOffset} with {response.recordCount}, not at {acked}"
                    )
                acked += expected
                answered += 1
                slots.release()
            code = await call.code()
        seconds = clock() - start
    finally:
        call.cancel()  # a no-op once the call has ended
    if code is not grpc.StatusCode.OK or answered != sent:
        raise BenchError(f"PublishBatch ended {code.name} after {answered} of {sent} answers")
    return acked, seconds


async def flux_publish_batched(
    broker: FluxBroker, case: Case, count: int, shape: BatchShape, *, max_seconds: float
) -> Result:
    """One timed :func:`publish_batches` run into a fresh stream, whose newest offset is checked."""
    name, _subject = await broker.create_stream(f"{case.scenario}-{case.size}")
    try:
        acked, seconds = await publish_batches(
            broker, name, case.size, count, shape, max_seconds=max_seconds
        )
        newest = await broker.newest_offset(name)
    finally:
        await broker.delete_stream(name)
    if newest != acked - 1:
        raise BenchError(f"{acked} records acked, but the newest offset is {newest}")
    return case.result(
        FLUX, shape.variant, acked, seconds,
        notes=f"PublishBatch, one call, batches of {shape.records} framed once, "
        f"{shape.window} in flight, ack LEADER",
    )  # fmt: skip


def _counted(batch: api_pb2.RecordBatch, received: int, each: int) -> int:
    """Row 3's check of a batch: offsets and sizes from its fields and its two end headers."""
    n, data = batch.recordCount, batch.records
    last = received + n - 1
    if (
        n <= 0
        or (batch.firstOffset, batch.lastOffset) != (received, last)
        or len(data) != n * each
        or HEADER.unpack_from(data, 0)[0] != received
        or HEADER.unpack_from(data, len(data) - each)[0] != last
    ):
        raise BenchError(
            f"after offset {received - 1}: a batch of {n} records, offsets "
            f"{batch.firstOffset}-{batch.lastOffset}, {len(data)} B"
        )
    return n


def _decoded(batch: api_pb2.RecordBatch, received: int) -> int:
    """Row 7's raw check: every record decoded (as the SDK does) and its offset checked."""
    records = decode_records(batch.records)
    if not records or len(records) != batch.recordCount:
        raise BenchError(
            f"after offset {received - 1}: {len(records)} records decoded of {batch.recordCount}"
        )
    for record in records:
        if record.offset != received:
            raise BenchError(f"offset {record.offset} where {received} was due")
        received += 1
    return len(records)


async def flux_subscribe_batched(
    broker: FluxBroker,
    case: Case,
    stream: str,
    count: int,
    max_bytes: int,
    *,
    max_seconds: float,
    decode: bool = False,
) -> Result:
    """Read ``stream`` (``count`` records) with ``SubscribeBatch`` from EARLIEST to STOP_LATEST.

    The first batch must be the empty handshake; each further one must continue the offsets
    of the one before, and the call must end OK after exactly ``count`` records. Row 3 checks a
    batch by its fields and end headers (``recordCount`` records of :func:`record_bytes` each);
    with ``decode`` -- row 7's raw baseline -- every record is decoded with ``decode_records``
    and its offset checked, as the SDK does. Reading stops early at the time cap.
    """
    each = record_bytes(case.size)
    request = api_pb2.SubscribeBatchRequest(
        subscribe=api_pb2.SubscribeRequest(
            stream=stream,
            partition=0,
            startPosition=api_pb2.EARLIEST,
            stopPosition=api_pb2.STOP_LATEST,
        ),
        maxBytes=max_bytes,
    )
    clock = time.perf_counter
    received = batches = 0
    capped = False
    gc.collect()
    start = clock()
    deadline = start + max_seconds
    call = broker.api.SubscribeBatch(request, timeout=max_seconds + DRAIN_TIMEOUT_S)
    try:
        async with asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S):
            handshake = True
            async for batch in call:
                if handshake:
                    if batch.recordCount or batch.records:
                        raise BenchError("SubscribeBatch began without its handshake")
                    handshake = False
                    continue
                received += _decoded(batch, received) if decode else _counted(batch, received, each)
                batches += 1
                if clock() > deadline:
                    capped = True
                    break
            code = grpc.StatusCode.CANCELLED if capped else await call.code()
        seconds = clock() - start
    finally:
        call.cancel()
    if not capped and (code is not grpc.StatusCode.OK or received != count):
        raise BenchError(f"SubscribeBatch ended {code.name} after {received} of {count} records")
    budget = f"{max_bytes // 1024} KiB" if max_bytes else "default (64 KiB)"
    variant = f"subscribe-batch-{max_bytes // 1024 or 64}k"
    notes = f"SubscribeBatch EARLIEST..STOP_LATEST, maxBytes {budget}, {batches} batches"
    if decode:
        variant = f"decoding-{variant}"
        notes += ", each decoded with decode_records, every offset checked"
    return case.result(FLUX, variant, received, seconds, notes=notes)


# -- the SDK against the raw calls (rows 6 and 7) -----------------------------------------------


def values_pool(size: int) -> list[bytes]:
    """:data:`POOL` random ``size``-byte values: the records of row 6, raw and SDK alike."""
    return [os.urandom(size) for _ in range(POOL)]


def cycled(values: Sequence[bytes], count: int) -> list[bytes]:
    """``count`` values taken from ``values`` in turn."""
    return [values[i % len(values)] for i in range(count)]


async def flux_publish_framing(
    broker: FluxBroker,
    case: Case,
    values: Sequence[bytes],
    count: int,
    shape: BatchShape,
    *,
    max_seconds: float,
) -> Result:
    """Row 6's raw baseline: :func:`publish_batches` framing each batch from its values.

    Each request is made when it is sent: every value is framed with ``encode_record`` (as
    ``send_batch`` does), the records joined, and the request built and serialized (as the
    SDK's stub does). The stream is fresh, and its newest offset is checked against the acks.
    """
    name, _subject = await broker.create_stream(f"{case.scenario}-{case.size}")
    batch_values = {n: cycled(values, n) for n in {shape.records, count % shape.records} if n}

    def make_request(n: int) -> bytes:
        records = b"".join([encode_record(value, None, ()) for value in batch_values[n]])
        return api_pb2.PublishBatchRequest(
            stream=name, partition=0, records=records, ackPolicy=LEADER
        ).SerializeToString()

    try:
        acked, seconds = await publish_batches(
            broker, name, case.size, count, shape, max_seconds=max_seconds,
            make_request=make_request,
        )  # fmt: skip
        newest = await broker.newest_offset(name)
    finally:
        await broker.delete_stream(name)
    if newest != acked - 1:
        raise BenchError(f"{acked} records acked, but the newest offset is {newest}")
    return case.result(
        FLUX, f"framing-{shape.variant}", acked, seconds,
        notes=f"PublishBatch, one call, each batch of {shape.records} framed from its values "
        f"with encode_record when sent, {shape.window} in flight, ack LEADER",
    )  # fmt: skip


def check_answers(answers: Sequence[Sequence[RecordMetadata]], total: int) -> None:
    """Check the ends of each ``send_batch`` answer: within 0 to ``total - 1``, in order.

    The first records of the answers must have distinct offsets. (Reading every record's
    metadata would take longer than sending it; the counts and the newest offset are checked
    by the caller.)
    """
    firsts = set()
    for metas in answers:
        first, last = metas[0].offset, metas[-1].offset
        if not 0 <= first <= last < total or last - first < len(metas) - 1 or first in firsts:
            raise BenchError(f"a send_batch of {len(metas)} records was acked at {first}-{last}")
        firsts.add(first)


async def sdk_publish(
    client: flux_client.Client,
    broker: FluxBroker,
    case: Case,
    values: Sequence[bytes],
    count: int,
    *,
    shape: SdkShape,
    max_seconds: float,
) -> Result:
    """Row 6's SDK side: ``shape.tasks`` tasks call ``send_batch`` until ``count`` or the cap.

    One default producer (idempotent, ack LEADER) per run, into a fresh stream, partition 0.
    Each call sends ``shape.records`` values and must answer with as many records' metadata.
    Afterwards (untimed) the answers are checked (:func:`check_answers`), the records answered
    must be the records sent, the producer's counters must agree, and the partition's newest
    offset must be the last one acked.
    """
    name, _subject = await broker.create_stream(f"{case.scenario}-{case.size}")
    chunk = cycled(values, shape.records)
    answers: list[Sequence[RecordMetadata]] = []
    clock = time.perf_counter
    sent = 0
    deadline = math.inf
    try:
        async with client.producer() as producer:

            async def caller() -> None:
                nonlocal sent
                while sent < count and (not sent or clock() < deadline):
                    n = min(shape.records, count - sent)
                    sent += n
                    metas = await producer.send_batch(
                        name, chunk if n == shape.records else chunk[:n], partition=0
                    )
                    if len(metas) != n:
                        raise BenchError(f"send_batch of {n} records answered {len(metas)}")
                    answers.append(metas)

            gc.collect()
            start = clock()
            deadline = start + max_seconds
            try:
                async with (
                    asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S),
                    asyncio.TaskGroup() as tasks,
                ):
                    for _ in range(shape.tasks):
                        tasks.create_task(caller())
            except ExceptionGroup as failed:
                first = failed.exceptions[0]
                raise BenchError(f"{type(first).__name__}: {first}") from failed
            seconds = clock() - start
            stats = producer.stats()
        newest = await broker.newest_offset(name)
    finally:
        await broker.delete_stream(name)
    acked = sum(map(len, answers))
    check_answers(answers, acked)
    if acked != sent or stats.records_acked != acked or stats.records_failed or newest != acked - 1:
        raise BenchError(
            f"{sent} records sent, {acked} answered, {stats.records_acked} acked and "
            f"{stats.records_failed} failed by the producer's count; newest offset {newest}"
        )
    return case.result(
        SDK, shape.variant, acked, seconds,
        notes=f"Producer.send_batch, {shape.tasks} task(s) each sending {shape.records} values "
        f"a call, partition 0, default producer (idempotent, ack LEADER, "
        f"{stats.batches_sent} batches)",
    )  # fmt: skip


async def sdk_subscribe(
    client: flux_client.Client,
    case: Case,
    stream: str,
    count: int,
    max_bytes: int,
    *,
    max_seconds: float,
) -> Result:
    """Row 7's SDK side: ``client.subscribe`` from EARLIEST to ``Stop.LATEST``, every message.

    Each message's offset must follow the one before; the iteration must end after exactly
    ``count`` messages. Reading stops early at the time cap (looked at every 4,096 messages).
    """
    clock = time.perf_counter
    expected = 0
    capped = False
    gc.collect()
    start = clock()
    deadline = start + max_seconds
    async with (
        asyncio.timeout(max_seconds + DRAIN_TIMEOUT_S),
        client.subscribe(
            stream, 0, start=Start.EARLIEST, stop=Stop.LATEST, max_batch_bytes=max_bytes or None
        ) as subscription,
    ):
        async for message in subscription:
            if message.offset != expected:
                raise BenchError(f"offset {message.offset} where {expected} was due")
            expected += 1
            if not expected & 0xFFF and clock() > deadline:
                capped = True
                break
        seconds = clock() - start
    if not capped and expected != count:
        raise BenchError(f"the subscription ended after {expected} of {count} records")
    budget = f"{max_bytes // 1024} KiB" if max_bytes else "default (64 KiB)"
    return case.result(
        SDK, f"subscribe-{max_bytes // 1024 or 64}k", expected, seconds,
        notes=f"client.subscribe(stream, 0, start=Start.EARLIEST, stop=Stop.LATEST), "
        f"max_batch_bytes {budget}, every offset checked",
    )  # fmt: skip


# -- the rows -----------------------------------------------------------------------------------


Runner: TypeAlias = Callable[[FluxBroker, int, Plan], Awaitable[list[Result]]]


async def _measure(
    results: list[Result], case: Case, variant: str, run: Awaitable[Result], *, tool: str = FLUX
) -> None:
    await jb.measure(results, say, case, guarded(run), tool=tool, variant=variant)


async def row_acked(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 1 for Flux: NATS ingest, 256 in flight."""
    case = Case("acked", broker.policy, size)
    results: list[Result] = []
    run = flux_nats_acked(broker, case, plan.acked, ACKED_WINDOW, max_seconds=plan.max_seconds)
    await _measure(results, case, f"nats-ingest-{ACKED_WINDOW}", run)
    return results


async def _batched(broker: FluxBroker, size: int, plan: Plan, scenario: str) -> list[Result]:
    case = Case(scenario, broker.policy, size)
    results: list[Result] = []
    for shape in plan.shapes[size]:
        run = flux_publish_batched(broker, case, plan.batched, shape, max_seconds=plan.max_seconds)
        await _measure(results, case, shape.variant, run)
    return results


async def row_batched(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 2 for Flux: PublishBatch with each batch shape of the plan."""
    return await _batched(broker, size, plan, "batched")


async def row_durable(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 5 for Flux: row 2 on the broker whose sync policy is ``always``."""
    return await _batched(broker, size, plan, "durable")


async def row_consume(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 3 for Flux: fill a stream (untimed), then read it with each SubscribeBatch budget."""
    case = Case("consume", broker.policy, size)
    count = plan.consume(size)
    results: list[Result] = []
    name, _subject = await broker.create_stream(f"consume-{size}")
    try:
        say(f"    filling {name} with {count:,} records of {size} B (untimed)")
        shape = BatchShape(max(1, FILL_BATCH_BYTES // record_bytes(size)), FILL_WINDOW)
        fill = publish_batches(broker, name, size, count, shape, max_seconds=4 * plan.max_seconds)
        try:
            acked, _seconds = await fill
            if acked != count:
                raise BenchError(f"the fill stopped at the time cap after {acked:,} records")
        except (BenchError, grpc.aio.AioRpcError, TimeoutError) as error:
            say(f"    FAILED to fill {name}: {error}")
            return [case.failed(FLUX, "fill", error)]
        for max_bytes in SUBSCRIBE_MAX_BYTES:
            run = flux_subscribe_batched(
                broker, case, name, count, max_bytes, max_seconds=plan.max_seconds
            )
            await _measure(results, case, f"subscribe-batch-{max_bytes}", run)
    finally:
        await broker.delete_stream(name)
    return results


async def fill_stream(broker: FluxBroker, name: str, size: int, count: int, plan: Plan) -> None:
    """Fill stream ``name`` with ``count`` records of ``size`` B through ``PublishBatch``.

    Raises:
        BenchError: The fill stopped at its time cap (4x the plan's) or failed.
    """
    say(f"    filling {name} with {count:,} records of {size} B (untimed)")
    shape = BatchShape(max(1, FILL_BATCH_BYTES // record_bytes(size)), FILL_WINDOW)
    fill = publish_batches(broker, name, size, count, shape, max_seconds=4 * plan.max_seconds)
    try:
        acked, _seconds = await fill
    except (grpc.aio.AioRpcError, TimeoutError) as error:
        raise BenchError(f"{type(error).__name__}: {error}") from error
    if acked != count:
        raise BenchError(f"the fill stopped at the time cap after {acked:,} records")


async def connect_sdk(broker: FluxBroker) -> flux_client.Client:
    """A ``flux_client`` client of the broker the other rows use (its gRPC address)."""
    return await flux_client.connect(broker.process.address, connect_timeout_ms=10_000)


async def row_sdk_publish(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 6: row 2's way, the raw call framing per batch, and ``send_batch``, in turn.

    Row 2's way runs first with each batch shape of the plan; then the raw framing runs (same
    shapes) and the SDK runs (the plan's ``send_batch`` calls) alternate, so that both see
    about the same machine load. Every run uses the same pool of random values.
    """
    case = Case("sdk-publish", broker.policy, size)
    results: list[Result] = []
    cap = plan.max_seconds
    for shape in plan.shapes[size]:
        run = flux_publish_batched(broker, case, plan.batched, shape, max_seconds=cap)
        await _measure(results, case, shape.variant, run)
    values = values_pool(size)
    try:
        client = await connect_sdk(broker)
    except FluxError as error:
        say(f"    FAILED to connect flux_client: {error}")
        return [*results, case.failed(SDK, "connect", error)]
    async with client:
        pairs = itertools.zip_longest(plan.shapes[size], plan.sdk_shapes[size])
        for raw_shape, sdk_shape in pairs:
            if raw_shape is not None:
                run = flux_publish_framing(
                    broker, case, values, plan.batched, raw_shape, max_seconds=cap
                )
                await _measure(results, case, f"framing-{raw_shape.variant}", run)
            if sdk_shape is not None:
                run = sdk_publish(
                    client, broker, case, values, plan.batched, shape=sdk_shape, max_seconds=cap
                )
                await _measure(results, case, sdk_shape.variant, run, tool=SDK)
    return results


async def row_sdk_consume(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 7: one stream as large as row 3's, read by row 3's way, decoding, and the SDK.

    For each ``maxBytes`` of row 3 (1 MiB, and the 64 KiB default, also the SDK's default)
    the three readers run in turn: row 3's ``SubscribeBatch``, the same decoding every batch,
    and ``client.subscribe`` with that ``max_batch_bytes``.
    """
    case = Case("sdk-consume", broker.policy, size)
    count = plan.consume(size)
    cap = plan.max_seconds
    results: list[Result] = []
    name, _subject = await broker.create_stream(f"sdk-consume-{size}")
    try:
        try:
            await fill_stream(broker, name, size, count, plan)
        except BenchError as error:
            say(f"    FAILED to fill {name}: {error}")
            return [case.failed(FLUX, "fill", error)]
        try:
            client = await connect_sdk(broker)
        except FluxError as error:
            say(f"    FAILED to connect flux_client: {error}")
            return [case.failed(SDK, "connect", error)]
        async with client:
            for max_bytes in SUBSCRIBE_MAX_BYTES:
                kib = max_bytes // 1024 or 64
                run = flux_subscribe_batched(broker, case, name, count, max_bytes, max_seconds=cap)
                await _measure(results, case, f"subscribe-batch-{kib}k", run)
                run = flux_subscribe_batched(
                    broker, case, name, count, max_bytes, max_seconds=cap, decode=True
                )
                await _measure(results, case, f"decoding-subscribe-batch-{kib}k", run)
                run = sdk_subscribe(client, case, name, count, max_bytes, max_seconds=cap)
                await _measure(results, case, f"subscribe-{kib}k", run, tool=SDK)
    finally:
        await broker.delete_stream(name)
    return results


async def row_one_by_one(broker: FluxBroker, size: int, plan: Plan) -> list[Result]:
    """Row 4 for Flux: one envelope at a time over NATS."""
    case = Case("one-by-one", broker.policy, size)
    results: list[Result] = []
    run = flux_nats_one_by_one(broker, case, plan.one_by_one, max_seconds=plan.max_seconds)
    await _measure(results, case, "nats-envelope", run)
    return results


FLUX_ROWS: Final[dict[str, Runner]] = {
    "acked": row_acked,
    "batched": row_batched,
    "consume": row_consume,
    "one-by-one": row_one_by_one,
    "durable": row_durable,
    "sdk-publish": row_sdk_publish,
    "sdk-consume": row_sdk_consume,
}


async def warm_up(broker: FluxBroker, rows: Sequence[RowSpec], plan: Plan) -> None:
    """A short untimed pass over each Flux path the rows use (code paths, connections)."""
    n, cap = plan.warmup, plan.max_seconds
    keys = {row.key for row in rows}
    with contextlib.suppress(
        BenchError, grpc.aio.AioRpcError, TimeoutError, nats.errors.Error, FluxError
    ):
        if keys & {"acked", "one-by-one"}:
            case = Case("warmup", broker.policy, 128)
            await flux_nats_acked(broker, case, n, ACKED_WINDOW, max_seconds=cap)
            await flux_nats_one_by_one(broker, case, max(1, n // 10), max_seconds=cap)
        if keys & {"batched", "consume", "durable", "sdk-publish", "sdk-consume"}:
            case = Case("warmup", broker.policy, 128)
            name, _subject = await broker.create_stream("warmup-batch")
            try:
                await publish_batches(broker, name, 128, 10 * n, BatchShape(n, 4), max_seconds=cap)
                await flux_subscribe_batched(broker, case, name, 10 * n, 0, max_seconds=cap)
            finally:
                await broker.delete_stream(name)
        if keys & {"sdk-publish", "sdk-consume"}:
            case = Case("warmup", broker.policy, 128)
            values = values_pool(128)
            async with await connect_sdk(broker) as client:
                await flux_publish_framing(
                    broker, case, values, 10 * n, BatchShape(n, 4), max_seconds=cap
                )
                await sdk_publish(
                    client, broker, case, values, 10 * n, shape=SdkShape(n, 4), max_seconds=cap
                )
                name, _subject = await broker.create_stream("warmup-sdk")
                try:
                    await publish_batches(
                        broker, name, 128, 10 * n, BatchShape(n, 4), max_seconds=cap
                    )
                    await flux_subscribe_batched(
                        broker, case, name, 10 * n, 0, max_seconds=cap, decode=True
                    )
                    await sdk_subscribe(client, case, name, 10 * n, 0, max_seconds=cap)
                finally:
                    await broker.delete_stream(name)


# -- a run --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """Everything one run measured, of both systems."""

    results: list[Result] = field(default_factory=list)
    #: Peak RSS in bytes by server process, e.g. ``jetstream (sync default)``.
    peak_rss_bytes: dict[str, int | None] = field(default_factory=dict)
    natscli_version: str | None = None
    nats_server_version: str = ""
    seconds: float = 0.0


async def run_pass(
    run: Run,
    rows: Sequence[RowSpec],
    sizes: Sequence[int],
    plan: Plan,
    *,
    durable: bool,
    bench: jb.NatsBench | None,
    root: Path,
) -> None:
    """Start a JetStream server and a broker of one sync meaning; run ``rows`` on both.

    For each row and size JetStream runs first, then Flux.
    """
    policy = "always" if durable else "never"
    async with (
        jb.JetStreamServer(sync_always=durable, data_dir=root) as js,
        running_flux(root, policy) as broker,
    ):
        say(
            f"pass {'durable' if durable else 'written'}: nats-server -js pid {js.pid} "
            f"(sync {js.sync}), flux-broker pid {broker.process.pid} (sync policy {policy})"
        )
        await warm_up(broker, rows, plan)
        for row in rows:
            for size in sizes:
                if row.jetstream:  # the SDK rows' baseline is the raw call, measured by Flux's
                    count = plan.jetstream.count(row.jetstream, size, durable=durable)
                    say(f"  {row.number}. {row.title}, {size} B: JetStream {row.jetstream}")
                    run.results += await jb.SCENARIO_FUNCTIONS[row.jetstream](
                        js, bench, size, count, max_seconds=plan.max_seconds, log=say
                    )
                say(
                    f"  {row.number}. {row.title}, {size} B: {'SDK and raw' if row.sdk else 'Flux'}"
                )
                run.results += await FLUX_ROWS[row.key](broker, size, plan)
        for process, peak in broker.peak_rss_bytes().items():
            run.peak_rss_bytes[f"flux {process} (sync {policy})"] = peak
    run.peak_rss_bytes[f"jetstream nats-server (sync {js.sync})"] = js.peak_rss_bytes


async def run_all(args: argparse.Namespace, plan: Plan, natscli: Path | None) -> Run:
    """Both passes (the durable one only when row 5 is chosen); the results."""
    started = time.perf_counter()
    run = Run(
        natscli_version=jb.NATSCLI_VERSION if natscli is not None else None,
        nats_server_version=await asyncio.to_thread(jb.nats_server_version),
    )
    bench = jb.NatsBench(natscli, say) if natscli is not None else None
    rows = [row for row in ROWS if row.key in args.only]
    with tempfile.TemporaryDirectory(prefix="flux-data-path-", dir=args.data_dir) as tmp:
        for durable in (False, True):
            chosen = [row for row in rows if row.durable == durable]
            if chosen:
                await run_pass(
                    run, chosen, args.size, plan, durable=durable, bench=bench, root=Path(tmp)
                )
    run.seconds = time.perf_counter() - started
    return run


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the table: a row at one size, the best figure of each system and tool."""

    row: RowSpec
    size: int
    flux: Result | None
    nats_bench: Result | None
    nats_py: Result | None

    @property
    def jetstream(self) -> Result | None:
        """The better of the two JetStream figures."""
        return _best([r for r in (self.nats_bench, self.nats_py) if r], latency=self.row.latency)

    @property
    def ratio(self) -> float | None:
        """Flux / JetStream in records/s; JetStream / Flux in p50 latency (>1: Flux ahead)."""
        flux, js = self.flux, self.jetstream
        if flux is None or js is None:
            return None
        if self.row.latency:
            if not flux.p50_us or js.p50_us is None:
                return None
            return js.p50_us / flux.p50_us
        return flux.records_per_s / js.records_per_s if js.records_per_s else None

    @property
    def target(self) -> tuple[str, bool | None]:
        """The issue's target (128 B records only) and whether it is met (``None``: no target)."""
        target = self.row.target
        if target is None or self.size != TARGET_SIZE:
            return "", None
        flux = self.flux
        if flux is None:
            return target.text, False
        return target.text, target.met(self.ratio, flux.records_per_s, flux.p50_us)

    def to_json(self) -> dict[str, object]:
        """The JSON form."""
        target, met = self.target
        js = self.jetstream
        return {
            "row": self.row.number,
            "key": self.row.key,
            "title": self.row.title,
            "size": self.size,
            "flux": self.flux.case_id if self.flux else None,
            "flux_records_per_s": self.flux.records_per_s if self.flux else None,
            "flux_p50_us": self.flux.p50_us if self.flux else None,
            "flux_p99_us": self.flux.p99_us if self.flux else None,
            "jetstream": js.case_id if js else None,
            "jetstream_records_per_s": js.records_per_s if js else None,
            "jetstream_p50_us": js.p50_us if js else None,
            "jetstream_p99_us": js.p99_us if js else None,
            "nats_bench": self.nats_bench.case_id if self.nats_bench else None,
            "nats_py": self.nats_py.case_id if self.nats_py else None,
            "ratio": self.ratio,
            "target": target or None,
            "met": met,
        }


def _best(results: Sequence[Result], *, latency: bool) -> Result | None:
    """The fastest of ``results`` (the lowest p50 for latency), ignoring failed ones."""
    ok = [r for r in results if r.records and (not latency or r.p50_us is not None)]
    if latency:
        return min(ok, key=lambda r: r.p50_us or math.inf, default=None)
    return max(ok, key=lambda r: r.records_per_s, default=None)


def sdk_kind(result: Result) -> str:
    """``sdk``, ``raw`` (the same client work as the SDK) or ``row`` (row 2's or 3's way)."""
    if result.tool == SDK:
        return "sdk"
    if result.variant.startswith(("framing-", "decoding-")):
        return "raw"
    return "row"


@dataclass(frozen=True, slots=True)
class SdkLine:
    """One line of the SDK table: row 6 or 7 at one size, the best figure of each reader/writer.

    Attributes:
        sdk: The best ``flux_client`` figure.
        raw: The best raw-call figure doing the same client work (the baseline).
        raw_row: The best figure of the raw call as row 2 or 3 drives it (for information).
    """

    row: RowSpec
    size: int
    sdk: Result | None
    raw: Result | None
    raw_row: Result | None

    @staticmethod
    def _ratio(top: Result | None, bottom: Result | None) -> float | None:
        if top is None or bottom is None or not bottom.records_per_s:
            return None
        return top.records_per_s / bottom.records_per_s

    @property
    def ratio(self) -> float | None:
        """SDK / raw doing the same work: the issue's criterion."""
        return self._ratio(self.sdk, self.raw)

    @property
    def ratio_to_row(self) -> float | None:
        """SDK / the raw call as row 2 or 3 drives it."""
        return self._ratio(self.sdk, self.raw_row)

    @property
    def target(self) -> tuple[str, bool | None]:
        """The issue's target (at every size) and whether it is met."""
        target = self.row.target
        if target is None:
            return "", None
        if self.sdk is None:
            return target.text, False
        return target.text, target.met(self.ratio, self.sdk.records_per_s, None)

    def to_json(self) -> dict[str, object]:
        """The JSON form."""
        target, met = self.target

        def case(result: Result | None) -> str | None:
            return result.case_id if result else None

        def rate(result: Result | None) -> float | None:
            return result.records_per_s if result else None

        return {
            "row": self.row.number,
            "key": self.row.key,
            "title": self.row.title,
            "size": self.size,
            "sdk": case(self.sdk),
            "sdk_records_per_s": rate(self.sdk),
            "baseline": case(self.raw),
            "baseline_records_per_s": rate(self.raw),
            "ratio": self.ratio,
            "raw_row": case(self.raw_row),
            "raw_row_records_per_s": rate(self.raw_row),
            "ratio_to_raw_row": self.ratio_to_row,
            "target": target or None,
            "met": met,
        }


def sdk_lines(run: Run, args: argparse.Namespace) -> list[SdkLine]:
    """The SDK table's lines: rows 6 and 7, if chosen, at each size."""
    table = []
    for row in ROWS:
        if row.key not in args.only or not row.sdk:
            continue
        for size in args.size:
            mine = [r for r in run.results if (r.scenario, r.size) == (row.key, size)]
            best = {
                kind: _best([r for r in mine if sdk_kind(r) == kind], latency=False)
                for kind in ("sdk", "raw", "row")
            }
            table.append(SdkLine(row, size, best["sdk"], best["raw"], best["row"]))
    return table


def lines(run: Run, args: argparse.Namespace) -> list[Line]:
    """The table's lines: each chosen row at each size."""
    table = []
    for row in ROWS:
        if row.key not in args.only or row.sdk:
            continue
        js_sync = "always" if row.durable else "default"
        for size in args.size:

            def pick(
                tool: str, scenario: str, sync: str, size: int = size, latency: bool = row.latency
            ) -> Result | None:
                picked = [
                    r
                    for r in run.results
                    if (r.tool, r.scenario, r.sync, r.size) == (tool, scenario, sync, size)
                ]
                return _best(picked, latency=latency)

            flux = pick(FLUX, row.key, "always" if row.durable else "never")
            table.append(
                Line(
                    row,
                    size,
                    flux,
                    pick(jb.NATS_BENCH, row.jetstream, js_sync),
                    pick(jb.NATS_PY, row.jetstream, js_sync),
                )
            )
    return table


def _figure(result: Result | None, *, latency: bool) -> str:
    if result is None:
        return "FAILED / not run"
    if latency:
        return f"{result.p50_us or 0:,.0f} / {result.p99_us or 0:,.0f} µs"
    return f"{result.records_per_s:,.0f}/s"


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:,.0f} MiB"


COLUMNS: Final = (
    "#", "row", "size", "Flux", "Flux variant", "JetStream best", "JetStream variant",
    "nats-py best", "ratio", "target", "met",
)  # fmt: skip
#: Text table: each column's width, negative for left-aligned.
WIDTHS: Final = (-1, -28, 5, 16, -21, 16, -26, 16, 6, -15, -3)


def cells(line: Line) -> list[str]:
    """One line of the table as text cells, in the order of :data:`COLUMNS`."""
    latency = line.row.latency
    target, met = line.target
    ratio, js = line.ratio, line.jetstream
    return [
        str(line.row.number),
        line.row.title,
        str(line.size),
        _figure(line.flux, latency=latency),
        line.flux.variant if line.flux else "",
        _figure(js, latency=latency),
        f"{js.tool} {js.variant}" if js else "",
        _figure(line.nats_py, latency=latency),
        "" if ratio is None else f"{ratio:.2f}x",
        target,
        {True: "yes", False: "NO", None: ""}[met],
    ]


SDK_COLUMNS: Final = (
    "#", "row", "size", "flux_client", "SDK variant", "raw, same work", "raw variant", "ratio",
    "target", "met", "raw, row 2/3 way", "SDK / row 2/3",
)  # fmt: skip
SDK_WIDTHS: Final = (-1, -21, 5, 12, -18, 12, -31, 6, -10, -3, 16, 13)


def sdk_cells(line: SdkLine) -> list[str]:
    """One line of the SDK table as text cells, in the order of :data:`SDK_COLUMNS`."""
    target, met = line.target
    ratio, to_row = line.ratio, line.ratio_to_row
    return [
        str(line.row.number),
        line.row.title,
        str(line.size),
        _figure(line.sdk, latency=False),
        line.sdk.variant if line.sdk else "",
        _figure(line.raw, latency=False),
        line.raw.variant if line.raw else "",
        "" if ratio is None else f"{ratio:.2f}x",
        target,
        {True: "yes", False: "NO", None: ""}[met],
        _figure(line.raw_row, latency=False),
        "" if to_row is None else f"{to_row:.2f}x",
    ]


SDK_CAPTION: Final = (
    "flux_client (SDK) vs the raw batched RPC doing the same client work: records/s; ratio = "
    "SDK / raw (row 6: the raw call frames every batch from its values; row 7: it decodes every "
    "batch); target: the SDK loses at most 20 %, at every size. Row 2/3 way: the raw call as "
    "rows 2 and 3 drive it (batches framed once and resent; records not decoded), for "
    "information."
)


def _text_table(
    columns: Sequence[str], widths: Sequence[int], rows: Sequence[Sequence[str]]
) -> list[str]:
    """A text table: a header, a rule and ``rows``, each column padded to its width."""

    def row(texts: Sequence[str]) -> str:
        return " ".join(
            f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"
            for text, width in zip(texts, widths, strict=True)
        ).rstrip()

    header = row(columns)
    return [header, "-" * len(header), *(row(texts) for texts in rows)]


def _markdown_table(
    columns: Sequence[str], widths: Sequence[int], rows: Sequence[Sequence[str]]
) -> list[str]:
    """A Markdown table; numeric columns (positive widths) right-aligned."""
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if width > 0 else "---" for width in widths) + "|",
        *("| " + " | ".join(texts) + " |" for texts in rows),
    ]


def caption(run: Run) -> str:
    """What the table shows, in one sentence."""
    return (
        f"Flux vs NATS JetStream {run.nats_server_version} (R1, file store), natscli "
        f"{run.natscli_version or '(not available: nats-py only)'}: records/s, or p50 / p99 of "
        "one publish; ratio = Flux / best JetStream (latency: JetStream p50 / Flux p50); "
        f"targets for {TARGET_SIZE} B records."
    )


def report(run: Run, table: Sequence[Line], sdk_table: Sequence[SdkLine] = ()) -> list[str]:
    """The printed results: the table(s), the failures, the peak RSS."""
    out = [""]
    if table:
        out += [caption(run), *_text_table(COLUMNS, WIDTHS, [cells(line) for line in table])]
        out.append("")
    if sdk_table:
        rows = [sdk_cells(line) for line in sdk_table]
        out += [SDK_CAPTION, *_text_table(SDK_COLUMNS, SDK_WIDTHS, rows), ""]
    for r in run.results:
        if r.error:
            out.append(f"FAILED {r.case_id}: {r.error.splitlines()[0][:160]}")
    rss = ", ".join(f"{name} {_mib(peak)}" for name, peak in run.peak_rss_bytes.items())
    out.append(f"Peak RSS (VmHWM): {rss}")
    return out


def markdown(
    run: Run, args: argparse.Namespace, table: Sequence[Line], sdk_table: Sequence[SdkLine] = ()
) -> str:
    """The table(s) as Markdown, with the run's context and peak RSS (for the docs)."""
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    context = (
        f"{'Quick' if args.quick else 'Full'} run of {created} on {os.cpu_count()} CPUs "
        f"({platform.system()}, Python {sys.version.split()[0]}), {run.seconds:.0f} s."
    )
    out = [f"<!-- Written by broker/bench/{SCRIPT.name}; do not edit. -->", ""]
    if table:
        out += [f"{context} {caption(run)}", ""]
        out += _markdown_table(COLUMNS, WIDTHS, [cells(line) for line in table])
        context = "The SDK rows, same run."
    if sdk_table:
        if table:
            out.append("")
        out += [f"{context} {SDK_CAPTION}", ""]
        out += _markdown_table(SDK_COLUMNS, SDK_WIDTHS, [sdk_cells(line) for line in sdk_table])
    out += ["", "Peak RSS (VmHWM) of each server process:", ""]
    out += [f"- {name}: {_mib(peak)}" for name, peak in run.peak_rss_bytes.items()]
    failures = [r for r in run.results if r.error]
    if failures:
        out += ["", "Failed measurements:", ""]
        out += [f"- `{r.case_id}`: {r.error.splitlines()[0][:160]}" for r in failures]
    return "\n".join(out) + "\n"


# -- files --------------------------------------------------------------------------------------


def write_json(
    path: Path,
    args: argparse.Namespace,
    plan: Plan,
    run: Run,
    table: Sequence[Line],
    *,
    sdk_table: Sequence[SdkLine] = (),
) -> None:
    """Write the tables, every measurement and the run's context as JSON.

    ``table`` holds rows 1-5 (Flux against JetStream), ``sdk_table`` rows 6 and 7 (the SDK
    against the raw call doing the same work, whose figure is ``baseline``).
    """
    document = {
        "benchmark": PROGRAM,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
            "nats_py": importlib.metadata.version("nats-py"),
            "flux_client": flux_client.__version__,
            "nats_server": run.nats_server_version,
            "natscli": run.natscli_version,
        },
        "plan": {
            "quick": args.quick,
            "rows": args.only,
            "sizes": args.size,
            "max_seconds": plan.max_seconds,
            "flux": {
                "acked": plan.acked,
                "batched": plan.batched,
                "one_by_one": plan.one_by_one,
                "consume": {str(size): plan.consume(size) for size in args.size},
                "shapes": {
                    str(size): [shape.variant for shape in shapes]
                    for size, shapes in plan.shapes.items()
                },
                "sdk_shapes": {
                    str(size): [shape.variant for shape in shapes]
                    for size, shapes in plan.sdk_shapes.items()
                },
            },
            "jetstream": {
                "acked": plan.jetstream.acked,
                "async": plan.jetstream.async_,
                "consume": plan.jetstream.consume,
                "consume_large": plan.jetstream.consume_large,
                "one_by_one": plan.jetstream.one_by_one,
                "durable": plan.jetstream.durable,
            },
        },
        "peak_rss_bytes": run.peak_rss_bytes,
        "seconds": run.seconds,
        "table": [line.to_json() for line in table],
        "sdk_table": [line.to_json() for line in sdk_table],
        "results": [r.to_json() for r in run.results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


SERIES: Final = (("Flux", "flux", "#1f6feb"), ("nats bench", "nats_bench", "#9a6700"),
                 ("nats-py", "nats_py", "#e3b341"))  # fmt: skip
BAR_HEIGHT: Final = 0.26


def goal(line: Line) -> float | None:
    """Where the line's target puts Flux: records/s, or p50 µs for latency (``None``: none)."""
    target, js = line.row.target, line.jetstream
    if target is None or line.size != TARGET_SIZE:
        return None
    if line.row.latency:
        return target.max_p50_us if math.isfinite(target.max_p50_us) else None
    floor = target.min_rate
    if js is not None:
        floor = max(floor, js.records_per_s * max(target.min_ratio, 1.0 if target.ahead else 0.0))
    return floor or None


def _draw_panel(axis: Axes, chosen: Sequence[Line], *, latency: bool) -> None:
    """Bars of one panel: per line Flux, nats bench, nats-py; ratios; target markers."""
    for k, (name, attribute, color) in enumerate(SERIES):
        results: list[Result | None] = [getattr(line, attribute) for line in chosen]
        positions = [i + (k - 1) * BAR_HEIGHT for i in range(len(chosen))]
        if latency:
            p50 = [r.p50_us if r and r.p50_us else 0.0 for r in results]
            p99 = [r.p99_us - r.p50_us if r and r.p50_us and r.p99_us else 0.0 for r in results]
            axis.barh(positions, p50, BAR_HEIGHT, xerr=[[0.0] * len(p50), p99], label=name,
                      color=color, capsize=2, error_kw={"elinewidth": 0.8})  # fmt: skip
        else:
            rates = [r.records_per_s if r else 0.0 for r in results]
            axis.barh(positions, rates, BAR_HEIGHT, label=name, color=color)
    for i, line in enumerate(chosen):
        flux = line.flux
        if flux is not None and line.ratio is not None:
            end = (flux.p99_us or 0.0) if latency else flux.records_per_s
            axis.annotate(f" {line.ratio:.2f}x", (end, i - BAR_HEIGHT), va="center", fontsize=8)
        at = goal(line)
        if at is not None:
            label = "target" if i == 0 or goal(chosen[0]) is None else None
            axis.plot([at], [i - BAR_HEIGHT], marker="|", markersize=14, markeredgewidth=2,
                      color="#cf222e", linestyle="none", label=label)  # fmt: skip
    labels = [f"{line.row.number}. {line.row.title}, {line.size} B" for line in chosen]
    axis.set_yticks(range(len(chosen)), labels, fontsize=8)
    axis.invert_yaxis()
    if latency:
        axis.set_xlabel("p50 of one publish, µs (whisker to p99)", fontsize=9)
    else:
        axis.set_xscale("log")
        axis.set_xlabel("records/s (log scale)", fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    axis.margins(x=0.3 if latency else 0.15)


SDK_SERIES: Final = (("flux_client", "sdk", "#8250df"), ("raw, same work", "raw", "#1f6feb"),
                     ("raw, row 2/3 way", "raw_row", "#8c959f"))  # fmt: skip


def _draw_sdk_panel(axis: Axes, chosen: Sequence[SdkLine]) -> None:
    """Bars of the SDK panel: per line the SDK, the raw baseline, row 2's or 3's way."""
    for k, (name, attribute, color) in enumerate(SDK_SERIES):
        results: list[Result | None] = [getattr(line, attribute) for line in chosen]
        positions = [i + (k - 1) * BAR_HEIGHT for i in range(len(chosen))]
        rates = [r.records_per_s if r else 0.0 for r in results]
        axis.barh(positions, rates, BAR_HEIGHT, label=name, color=color)
    for i, line in enumerate(chosen):
        target = line.row.target
        if line.sdk is not None and line.ratio is not None:
            axis.annotate(
                f" {line.ratio:.2f}x", (line.sdk.records_per_s, i - BAR_HEIGHT), va="center",
                fontsize=8,
            )  # fmt: skip
        if line.raw is not None and target is not None:
            axis.plot([line.raw.records_per_s * target.min_ratio], [i - BAR_HEIGHT], marker="|",
                      markersize=14, markeredgewidth=2, color="#cf222e", linestyle="none",
                      label="target (0.8x raw)" if i == 0 else None)  # fmt: skip
    labels = [f"{line.row.number}. {line.row.title}, {line.size} B" for line in chosen]
    axis.set_yticks(range(len(chosen)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("records/s", fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    axis.margins(x=0.15)
    axis.legend(loc="lower right", fontsize=8, frameon=False)


def write_chart(
    path: Path, table: Sequence[Line], title: str, sdk_table: Sequence[SdkLine] = ()
) -> None:
    """Draw the tables as a PNG: records/s of the throughput rows, p50/p99 of the latency row.

    Bars per line: Flux, ``nats bench`` and nats-py (their best variants); each Flux bar is
    labelled with its ratio, and a red mark shows where the 128 B target puts Flux. The SDK
    rows get a panel of their own below: the SDK, the raw same-work baseline (labelled with
    the ratio, the red mark at 0.8x of it) and row 2's or 3's way.
    """
    import matplotlib  # noqa: PLC0415 -- only a run that writes the chart needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    panels = [
        (chosen, latency)
        for chosen, latency in (
            ([line for line in table if not line.row.latency], False),
            ([line for line in table if line.row.latency], True),
        )
        if chosen
    ]
    if not panels and not sdk_table:
        return
    tallest = max((len(chosen) for chosen, _latency in panels), default=0)
    top = 1.6 + 0.8 * tallest if panels else 0.0
    bottom = 1.2 + 0.8 * len(sdk_table) if sdk_table else 0.0
    figure = pyplot.figure(figsize=(13, top + bottom))
    grid = figure.add_gridspec(
        int(bool(panels)) + int(bool(sdk_table)), max(1, len(panels)),
        height_ratios=[h for h in (top, bottom) if h],
        width_ratios=[2.2 if not latency else 1.0 for _chosen, latency in panels] or [1.0],
    )  # fmt: skip
    if panels:
        axes = [figure.add_subplot(grid[0, k]) for k in range(len(panels))]
        for axis, (chosen, latency) in zip(axes, panels, strict=True):
            _draw_panel(axis, chosen, latency=latency)
        handles, names = axes[0].get_legend_handles_labels()
        figure.legend(handles, names, loc="upper right", ncol=4, fontsize=8, frameon=False)
    if sdk_table:
        _draw_sdk_panel(figure.add_subplot(grid[int(bool(panels)), :]), sdk_table)
    figure.suptitle(title, fontsize=10, x=0.01, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (top + bottom)))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


# -- the program --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="data_path_bench.py",
        description="Flux's data paths (NATS ingest, PublishBatch, SubscribeBatch) against NATS "
        "JetStream (nats bench and nats-py), both started and measured in the same run; and "
        "the Python SDK (flux_client) against the raw batched RPCs doing the same work.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: about 40 s")
    parser.add_argument(
        "--size", action="append", type=int, choices=SIZES, help="record size (repeatable)"
    )
    parser.add_argument(
        "--only", action="append", choices=ROW_KEYS, help="run only this row (repeatable)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        metavar="DIR",
        help=f"where {JSON_NAME}, {MARKDOWN_NAME} and {PNG_NAME} go (default "
        "broker/bench/results/, "
        "broker/bench/results/quick/ with --quick)",
    )
    parser.add_argument("--no-chart", action="store_true", help="write no PNG chart")
    jb.add_server_arguments(parser)
    args = parser.parse_args(argv)
    args.size = list(dict.fromkeys(args.size or SIZES))
    args.only = [key for key in ROW_KEYS if key in (args.only or ROW_KEYS)]
    if args.out_dir is None:
        args.out_dir = QUICK_RESULTS_DIR if args.quick else RESULTS_DIR
    return args


async def main(args: argparse.Namespace, natscli: Path | None) -> int:
    """Run the rows, print the table, write the JSON and the chart; the exit status.

    SIGINT and SIGTERM cancel the run; the servers are stopped and their files removed first.
    """
    stopped_by = jb.cancel_on_signals()
    plan = QUICK if args.quick else FULL
    say(
        f"{PROGRAM}: Python {sys.version.split()[0]}, grpcio {grpc.__version__}, nats-py "
        f"{importlib.metadata.version('nats-py')}, {os.cpu_count()} CPUs; "
        f"{'quick' if args.quick else 'full'} run; rows {', '.join(args.only)}; sizes {args.size}"
    )
    try:
        run = await run_all(args, plan, natscli)
    except BaseException:
        if not stopped_by:
            raise
        # nats-py or grpc may turn the cancellation into an error of their own: stop either way.
        say(f"stopped by {stopped_by[0].name}; servers stopped, temporary files removed")
        return 128 + stopped_by[0]
    table = lines(run, args)
    sdk_table = sdk_lines(run, args)
    for line in report(run, table, sdk_table):
        say(line)
    json_path = args.out_dir / JSON_NAME
    write_json(json_path, args, plan, run, table, sdk_table=sdk_table)
    (args.out_dir / MARKDOWN_NAME).write_text(
        markdown(run, args, table, sdk_table), encoding="utf-8"
    )
    say(f"JSON and Markdown written to {json_path} and {MARKDOWN_NAME} beside it")
    if not args.no_chart:
        png_path = args.out_dir / PNG_NAME
        title = (
            f"Flux vs NATS JetStream {run.nats_server_version} (R1, file store), "
            f"{'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs"
        )
        await asyncio.to_thread(write_chart, png_path, table, title, sdk_table)
        say(f"chart written to {png_path}")
    say(f"total time {run.seconds:.0f} s")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The program: install natscli if needed (see :func:`jetstream_baseline.cli`), then run."""
    args = parse_args(argv)
    natscli = None
    if not args.no_natscli:
        previous = signal.signal(signal.SIGTERM, jb.interrupt)
        try:
            natscli = jb.install_natscli(args.bin_dir)
        except KeyboardInterrupt:
            say("interrupted while installing natscli")
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    return asyncio.run(main(args, natscli))


if __name__ == "__main__":
    sys.exit(cli())
