"""Fuzzing one running broker with random and mutated requests (reliability-plan §6.19-21).

Hypothesis draws short programs of actions against a single broker process:

- **gRPC**: a request body for one of the ``proto.API`` methods, sent as raw bytes (identity
  serializers): random bytes, or a valid serialized request with bytes flipped, cut, inserted
  or spliced. Many mutants still decode, so the broker also sees requests that are valid
  protobuf with strange values.
- **NATS**: payloads on a stream's subject and on the broker's ack inbox space: random bytes,
  envelopes with a random header (magic, version, header length, flags, message type, CRC),
  well-formed envelopes of random messages, and byte-level mutants of those.

After each program the broker must be consistent: the process runs, every status it sent
was a clear one (never INTERNAL, never UNKNOWN without an error-table reason), its log holds
no traceback, FetchMetadata answers, its streams are exactly those the test knows of (what
accepted CreateStream and DeleteStream requests made them) and match the data directory, and
a publish and subscribe round trip on a stream no request can name works.

Hypothesis drives the event loop explicitly (one loop for the module, with the broker's
channel and NATS connection on it), is derandomized, keeps no example database and runs a
bounded number of examples so that CI runs take the same, short time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
import nats
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from flux_broker.log.format import NewRecord, Placement, frame
from flux_broker.nats.envelope import CRC, HEADER, MAGIC, encode_message
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess, stop_all

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub

#: Examples per run: about 0.15 s each on a quiet 2-core machine, so a run takes ~12 s.
EXAMPLES: Final = 80
#: Deadline of requests that change metadata: long, so that an accepted one is never also
#: reported as timed out (the test would not know whether it happened).
ADMIN_TIMEOUT_S: Final = 10.0
#: Deadline of publishes: a mutated subject or inbox may wait for an ack that never comes.
PUBLISH_TIMEOUT_S: Final = 0.3
#: How long a streaming call is read before the test cancels it.
STREAM_READ_S: Final = 0.3
HOME: Final = "fuzz-home"  # the target of data-path templates and NATS payloads
OTHER: Final = "fuzz-other"  # the target of pause, read-only and delete templates
CHECK: Final = "fuzz-check"  # the round-trip stream: no template names it
NAMESPACE: Final = "liftbridge-default"
#: Statuses the broker sends without a reason: gRPC's own (a deadline, a cancel, a size).
_GRPC_OWN: Final = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
#: UNKNOWN is Liftbridge's code for these rows only.
_UNKNOWN_REASONS: Final = frozenset({"incorrect-offset", "ack-failed"})


def _records(*values: bytes) -> bytes:
    data, _ = frame(
        [NewRecord(value=v) for v in values], Placement(0, 0, 0, 0, 0), 1 << 30, 1 << 30
    )
    return bytes(data)


#: Valid requests to mutate: (method, kind, request).
TEMPLATES: Final[tuple[tuple[str, str, Any], ...]] = (
    ("CreateStream", "unary", api_pb2.CreateStreamRequest(name="fuzz-new", subject="fuzz.new")),
    ("DeleteStream", "unary", api_pb2.DeleteStreamRequest(name=OTHER)),
    ("PauseStream", "unary", api_pb2.PauseStreamRequest(name=OTHER, partitions=[0])),
    (
        "SetStreamReadonly",
        "unary",
        api_pb2.SetStreamReadonlyRequest(name=OTHER, partitions=[0], readonly=True),
    ),
    ("FetchMetadata", "unary", api_pb2.FetchMetadataRequest(streams=[HOME, "nope"])),
    (
        "FetchPartitionMetadata",
        "unary",
        api_pb2.FetchPartitionMetadataRequest(stream=HOME, partition=0),
    ),
    (
        "Publish",
        "unary",
        api_pb2.PublishRequest(
            stream=HOME, key=b"k", value=b"v", headers={"h": b"1"}, correlationId="c"
        ),
    ),
    (
        "PublishToSubject",
        "unary",
        api_pb2.PublishToSubjectRequest(subject="fuzz.home", value=b"v", correlationId="c"),
    ),
    ("SetCursor", "unary", api_pb2.SetCursorRequest(stream=HOME, cursorId="c", offset=0)),
    ("FetchCursor", "unary", api_pb2.FetchCursorRequest(stream=HOME, cursorId="c")),
    ("InitProducer", "unary", api_pb2.InitProducerRequest()),
    (
        "Subscribe",
        "server-streaming",
        api_pb2.SubscribeRequest(stream=HOME, startPosition=api_pb2.EARLIEST),
    ),
    (
        "SubscribeBatch",
        "server-streaming",
        api_pb2.SubscribeBatchRequest(
            subscribe=api_pb2.SubscribeRequest(stream=HOME, startPosition=api_pb2.EARLIEST),
            maxBytes=1024,
        ),
    ),
    (
        "PublishAsync",
        "bidi",
        api_pb2.PublishRequest(stream=HOME, value=b"v", correlationId="a"),
    ),
    (
        "PublishBatch",
        "bidi",
        api_pb2.PublishBatchRequest(stream=HOME, records=_records(b"a", b"b"), correlationId="b"),
    ),
)
_TIMEOUTS: Final = {"Publish": PUBLISH_TIMEOUT_S, "PublishToSubject": PUBLISH_TIMEOUT_S}


# -- strategies --------------------------------------------------------------------------------


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few random edits: flips, cuts, insertions, duplications."""
    result = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["flip", "set", "cut", "insert", "duplicate", "truncate"]))
        at = draw(st.integers(0, len(result)))
        if edit == "flip" and at < len(result):
            result[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "set" and at < len(result):
            result[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del result[at : at + draw(st.integers(1, 8))]
        elif edit == "insert":
            result[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "duplicate":
            result[at:at] = result[at : at + draw(st.integers(1, 16))]
        else:
            del result[at:]
    return bytes(result)


#: Strings that mean something to the broker, for generated requests' string fields.
_STRINGS: Final = st.sampled_from(
    [
        *(HOME, OTHER, "fuzz-new", "fuzz.home", "fuzz.new", "fuzz.*", "", ".", "..", "__cursors"),
        *("c", "a b", "x.>", "../x", "\x00", "fuzz.inbox", f"{NAMESPACE}.ack.x", "é" * 300),
    ]
)
_INT32: Final = st.one_of(
    st.integers(-3, 5), st.sampled_from([-(2**31), 2**31 - 1, 1025, 99, 1_000_000])
)
_INT64: Final = st.one_of(st.integers(-3, 5), st.sampled_from([-(2**63), 2**63 - 1, 10**12]))
_WRAPPED: Final = st.sampled_from([-1, 0, 10_000, 2**31 - 1])
#: Values of each scalar field type, within the ranges the broker must handle.
_SCALARS: Final[dict[int, st.SearchStrategy[Any]]] = {
    FieldDescriptor.TYPE_STRING: st.one_of(_STRINGS, st.text(max_size=12)),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_ENUM: _INT32,  # proto3 keeps numbers the enum does not name
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_UINT64: st.sampled_from([0, 1, 2**64 - 1]),
}


def _value(draw: st.DrawFn, member: FieldDescriptor, depth: int) -> object:
    """A value for one (non-repeated) field."""
    scalars = _SCALARS.get(member.type)
    if scalars is not None:
        return draw(scalars)
    descriptor = member.message_type
    assert descriptor is not None, member.full_name
    message: Any = message_factory.GetMessageClass(descriptor)()
    if descriptor.name == "NullableBool":
        message.value = draw(st.booleans())
    elif descriptor.name.startswith("Nullable"):  # the stream-setting overrides
        message.value = draw(_WRAPPED)
    else:
        _fill(draw, message, depth + 1)
    return message


def _fill(draw: st.DrawFn, message: Any, depth: int = 0) -> None:
    """Set a random subset of ``message``'s fields to drawn values."""
    for member in message.DESCRIPTOR.fields:
        if depth > 2 or not draw(st.booleans()):
            continue
        if member.message_type is not None and member.message_type.GetOptions().map_entry:
            entries = draw(st.dictionaries(st.text(max_size=8), st.binary(max_size=8), max_size=3))
            getattr(message, member.name).update(entries)
        elif member.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                getattr(message, member.name).append(_value(draw, member, depth))
        elif member.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, member.name).CopyFrom(_value(draw, member, depth))
        else:
            setattr(message, member.name, _value(draw, member, depth))


@st.composite
def _generated(draw: st.DrawFn, template: Any) -> bytes:
    """A request of ``template``'s type with random fields (valid protobuf, odd values)."""
    message = type(template)()
    _fill(draw, message)
    return bytes(message.SerializeToString())


@st.composite
def _grpc_action(draw: st.DrawFn) -> tuple[str, str, str, bytes]:
    """("grpc", method, kind, body)."""
    method, kind, template = draw(st.sampled_from(TEMPLATES))
    valid = template.SerializeToString()
    body = draw(
        st.one_of(
            st.binary(max_size=256),
            st.just(valid),
            _generated(template),
            _mutated(valid),
        )
    )
    return "grpc", method, kind, body


_INBOXES: Final = st.sampled_from(["", "fuzz.inbox", "a b", "x.*", "x.>", "a..b", "\x00", "."])
_MESSAGES: Final = st.builds(
    api_pb2.Message,
    offset=st.integers(-(2**63), 2**63 - 1),
    key=st.binary(max_size=16),
    value=st.binary(max_size=64),
    headers=st.dictionaries(st.text(max_size=8), st.binary(max_size=8), max_size=4),
    ackInbox=_INBOXES,
    correlationId=st.text(max_size=8),
    ackPolicy=st.sampled_from([0, 1, 2, 3, 99, -1]),
)


@st.composite
def _envelope(draw: st.DrawFn) -> bytes:
    """A payload for a stream subject: random, a random header, a message, or a mutant."""
    kind = draw(st.sampled_from(["random", "message", "mutant", "header", "header-crc", "short"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    message = draw(_MESSAGES)
    if kind == "message":
        return encode_message(message, crc=draw(st.booleans()))
    if kind == "mutant":
        return draw(_mutated(encode_message(message, crc=draw(st.booleans()))))
    header = HEADER.pack(
        draw(st.sampled_from([MAGIC, MAGIC, b"\xb9\x0e\x43\xb5", bytes(4)])),
        draw(st.sampled_from([0, 0, 1, 255])),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 255)),
    )
    if kind == "short":
        return header[: draw(st.integers(0, len(header) - 1))]
    crc = CRC.pack(draw(st.integers(0, 2**32 - 1))) if kind == "header-crc" else b""
    return header + crc + message.SerializeToString()


@st.composite
def _nats_action(draw: st.DrawFn) -> tuple[str, str, list[bytes]]:
    """("nats", subject, payloads): on the home stream's subject or the broker's ack inboxes."""
    subject = draw(st.sampled_from(["fuzz.home", f"{NAMESPACE}.ack.{uuid.UUID(int=0).hex}"]))
    return "nats", subject, draw(st.lists(_envelope(), min_size=1, max_size=8))


_ACTIONS: Final = st.lists(
    st.one_of(_grpc_action(), _grpc_action(), _nats_action()), min_size=1, max_size=8
)


# -- the broker under test -----------------------------------------------------------------------


@dataclass
class _Target:
    """The broker, a channel and a NATS connection on the module's loop, and what it holds."""

    broker: BrokerProcess
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel
    nc: Client
    #: Streams the broker must hold: internal ones, the fixture's, and what accepted requests
    #: created minus what they deleted.
    streams: set[str] = field(default_factory=set)
    round_trips: int = 0

    @property
    def api(self) -> API:
        """A client on the target's channel."""
        return api_pb2_grpc.APIStub(self.channel)

    def run(self, actions: list[Any]) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self._run(actions), 60))

    async def _run(self, actions: list[Any]) -> None:
        await self.ensure(HOME, "fuzz.home")
        await self.ensure(OTHER, "fuzz.other")
        for action in actions:
            if action[0] == "grpc":
                _, method, kind, body = action
                await self._call(method, kind, body)
            else:
                _, subject, payloads = action
                for payload in payloads:
                    await self.nc.publish(subject, payload)
                await self.nc.flush()
        await self._check()

    async def ensure(self, name: str, subject: str) -> None:
        """Re-create a fixture stream a request deleted; make it writable again."""
        if name not in self.streams:
            await self.api.CreateStream(
                api_pb2.CreateStreamRequest(name=name, subject=subject), timeout=ADMIN_TIMEOUT_S
            )
            self.streams.add(name)
        await self.api.SetStreamReadonly(
            api_pb2.SetStreamReadonlyRequest(name=name, readonly=False), timeout=ADMIN_TIMEOUT_S
        )

    async def _call(self, method: str, kind: str, body: bytes) -> None:
        try:
            await _raw(self.channel, method, kind, body, _TIMEOUTS.get(method, ADMIN_TIMEOUT_S))
        except grpc.aio.AioRpcError as error:
            _assert_clear(method, error)
            return
        self._accepted(method, body)

    def _accepted(self, method: str, body: bytes) -> None:
        """Track the streams an accepted request created or deleted."""
        if method == "CreateStream":
            self.streams.add(api_pb2.CreateStreamRequest.FromString(body).name)
        elif method == "DeleteStream":
            self.streams.discard(api_pb2.DeleteStreamRequest.FromString(body).name)

    async def _check(self) -> None:
        assert self.broker.running
        response = await self.api.FetchMetadata(
            api_pb2.FetchMetadataRequest(), timeout=ADMIN_TIMEOUT_S
        )
        held = {stream.name for stream in response.streamMetadata}
        assert held == self.streams
        on_disk = {path.name for path in (self.broker.data_dir / "streams").iterdir()}
        assert on_disk == held
        await self._round_trip()
        output = self.broker.output()
        assert "Traceback" not in output, output[-4000:]

    async def _round_trip(self) -> None:
        value = f"round-trip-{self.round_trips}".encode()
        self.round_trips += 1
        ack = await self.api.Publish(
            api_pb2.PublishRequest(stream=CHECK, value=value, ackPolicy=api_pb2.AckPolicy.ALL),
            timeout=ADMIN_TIMEOUT_S,
        )
        call = self.api.Subscribe(
            api_pb2.SubscribeRequest(
                stream=CHECK,
                startPosition=api_pb2.OFFSET,
                startOffset=ack.ack.offset,
                stopPosition=api_pb2.STOP_OFFSET,
                stopOffset=ack.ack.offset,
            ),
            timeout=ADMIN_TIMEOUT_S,
        )
        messages = []
        with contextlib.suppress(grpc.aio.AioRpcError):  # ends with stop-reached, checked below
            async for message in call:
                messages.append(message)
        assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [(m.offset, m.value) for m in messages[1:]] == [(ack.ack.offset, value)]


def _assert_clear(method: str, error: grpc.aio.AioRpcError) -> None:
    """A refusal is a status the error table names (or gRPC's own), never an internal failure."""
    code = error.code()
    reason = str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))
    assert code is not grpc.StatusCode.INTERNAL, (method, error.details())
    if code is grpc.StatusCode.UNKNOWN:
        assert reason in _UNKNOWN_REASONS, (method, error.details())
    if code not in _GRPC_OWN:
        assert reason, (method, code, error.details())


async def _raw(
    channel: grpc.aio.Channel, method: str, kind: str, body: bytes, timeout_s: float
) -> None:
    """Send ``body`` as ``method``'s request; read a streaming answer briefly, then cancel."""
    identity: Callable[[bytes], bytes] = bytes
    path = f"/proto.API/{method}"
    if kind == "unary":
        unary = channel.unary_unary(
            path, request_serializer=identity, response_deserializer=identity
        )
        await unary(body, timeout=timeout_s)
        return
    if kind == "server-streaming":
        stream = channel.unary_stream(
            path, request_serializer=identity, response_deserializer=identity
        )
        call: grpc.aio.Call = stream(body, timeout=ADMIN_TIMEOUT_S)
    else:

        async def one() -> AsyncIterator[bytes]:
            yield body

        bidi = channel.stream_stream(
            path, request_serializer=identity, response_deserializer=identity
        )
        call = bidi(one(), timeout=ADMIN_TIMEOUT_S)
    assert isinstance(call, AsyncIterable)
    try:
        async with asyncio.timeout(STREAM_READ_S):
            async for _ in call:
                pass
    except TimeoutError:
        call.cancel()  # still open: that is fine, the test ends it


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Target]:
    """One broker for every example, with the fixture streams, on the module's own loop."""
    root = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    brokers: list[BrokerProcess] = []
    try:
        broker = loop.run_until_complete(
            BrokerProcess.start(root / "data", work_dir=root / "run", registry=brokers)
        )
        target = loop.run_until_complete(_open(broker, loop))
        try:
            yield target
        finally:
            loop.run_until_complete(_close(target))
    finally:
        loop.run_until_complete(stop_all(brokers))
        loop.close()


async def _open(broker: BrokerProcess, loop: asyncio.AbstractEventLoop) -> _Target:
    channel = grpc.aio.insecure_channel(broker.address)
    nc = await nats.connect(broker.nats_url)
    target = _Target(broker=broker, loop=loop, channel=channel, nc=nc)
    response = await target.api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=10)
    target.streams = {stream.name for stream in response.streamMetadata}  # __cursors
    await target.api.CreateStream(
        api_pb2.CreateStreamRequest(name=CHECK, subject="fuzz.check"), timeout=10
    )
    target.streams.add(CHECK)
    return target


async def _close(target: _Target) -> None:
    await target.nc.close()
    await target.channel.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(actions=_ACTIONS)
def test_random_and_mutated_requests_leave_the_broker_consistent(
    target: _Target, actions: list[Any]
) -> None:
    target.run(actions)


def test_the_fuzzed_broker_still_stores_what_it_is_sent(target: _Target) -> None:
    """After the fuzzing (this test runs after it), the home stream still takes envelopes."""

    async def check() -> None:
        await target.ensure(HOME, "fuzz.home")
        # A gRPC publish first: it resumes the partition if a request paused it.
        ack = await target.api.Publish(
            api_pb2.PublishRequest(stream=HOME, value=b"resume"), timeout=ADMIN_TIMEOUT_S
        )
        await target.nc.publish("fuzz.home", encode_message(api_pb2.Message(value=b"last")))
        await target.nc.flush()

        async def stored() -> bool:
            response = await target.api.FetchPartitionMetadata(
                api_pb2.FetchPartitionMetadataRequest(stream=HOME), timeout=ADMIN_TIMEOUT_S
            )
            return bool(response.metadata.highWatermark > ack.ack.offset)

        await wait_for(stored, ADMIN_TIMEOUT_S, message="the envelope is stored")

    target.loop.run_until_complete(check())
