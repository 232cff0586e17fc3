"""The bad-input suite: reliability-plan §6, cases 1-23 and 26, against one real broker process.

This file is the index of those cases: each has a ``# §6.N`` comment, and either tests here
or a reference to the tests that already cover it completely. Statuses follow the precedence
of DESIGN.md §4 (Liftbridge's code and text win for its RPCs; ``flux-reason`` names the row of
the error table).

Every refused request must change nothing. A test takes a :class:`_State` before and after:
the data directory (every file's path and size), everything beside it (a name such as
``../../etc/x`` must never reach the filesystem) and FetchMetadata of every stream.

The tests share one broker (started once for the module, logging at debug level so that
anything that echoes a request reaches its output) and use their own stream names.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
import nats
import pytest
from nats.aio.client import Client

from flux_broker.log.commitlog import HW_CHECKPOINT_FILE
from flux_broker.log.format import NewRecord, Placement, frame
from flux_broker.nats.envelope import (
    CRC,
    HEADER,
    MAGIC,
    MessageType,
    decode_ack,
    encode,
    encode_ack,
    encode_message,
)
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess, stop_all

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub

#: Bound on one call that must succeed, or on waiting for a stored record: the broker is
#: local, but a shared 2-core machine can stall for seconds.
TIMEOUT_S: Final = 10.0
#: Longest status message a bad request may get: offending values are cut short.
MESSAGE_MAX_CHARS: Final = 400
#: The broker's default clustering.replication.max.bytes and limits.grpc.receive.max.bytes.
RECORD_MAX_BYTES: Final = 1024 * 1024
GRPC_RECEIVE_MAX_BYTES: Final = 16 * 1024 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
LEADER = api_pb2.AckPolicy.LEADER


# -- the shared broker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker for the module; its data directory is ``<root>/data``, its log ``<root>/run``."""
    root = tmp_path_factory.mktemp("bad-input")
    broker = asyncio.run(
        BrokerProcess.start(root / "data", work_dir=root / "run", args=("--level", "debug"))
    )
    try:
        yield broker
    finally:
        asyncio.run(stop_all([broker]))


@pytest.fixture
async def api(shared: BrokerProcess) -> AsyncIterator[API]:
    """A client of the shared broker, on a channel of this test's own."""
    async with grpc.aio.insecure_channel(shared.address) as channel:
        yield api_pb2_grpc.APIStub(channel)


@contextlib.asynccontextmanager
async def _nats(broker: BrokerProcess) -> AsyncIterator[Client]:
    nc = await nats.connect(broker.nats_url)
    try:
        yield nc
    finally:
        await nc.close()


def _name(prefix: str) -> str:
    """A stream name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- what a refused request must not change ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    """What the broker holds: files in and beside its data directory, and its metadata."""

    files: dict[str, int | None]
    beside: frozenset[str]
    metadata: api_pb2.FetchMetadataResponse


def _files(data_dir: Path) -> dict[str, int | None]:
    """Path and size of every file; no size for files rewritten on the broker's own schedule."""
    return {
        str(path.relative_to(data_dir)): (
            None if path.name == HW_CHECKPOINT_FILE else path.stat().st_size
        )
        for path in data_dir.rglob("*")
        # Temporary files (a checkpoint being replaced) come and go on their own.
        if path.is_file() and not path.name.endswith(".tmp")
    }


def _beside(broker: BrokerProcess) -> frozenset[str]:
    """Every path under the data directory's parent, but the data directory and the log's."""
    root = broker.data_dir.parent
    return frozenset(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.relative_to(root).parts[0] not in {broker.data_dir.name, broker.work_dir.name}
    )


async def _state(api: API, broker: BrokerProcess) -> _State:
    metadata = await api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=TIMEOUT_S)
    return _State(_files(broker.data_dir), _beside(broker), metadata)


@contextlib.asynccontextmanager
async def _unchanged(api: API, broker: BrokerProcess) -> AsyncIterator[None]:
    """Assert that the block changes nothing the broker holds, and nothing beside it."""
    before = await _state(api, broker)
    yield
    after = await _state(api, broker)
    assert after.files == before.files
    assert after.beside == before.beside == frozenset()
    assert after.metadata == before.metadata


# -- statuses ---------------------------------------------------------------------------------


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _collect(call: AsyncIterable[Any], into: list[Any]) -> None:
    """Append every message of a server-streaming call to ``into`` until it ends."""
    async with asyncio.timeout(TIMEOUT_S):
        async for message in call:
            into.append(message)


async def _stream_refused(call: AsyncIterable[object]) -> grpc.aio.AioRpcError:
    """The status ending a server-streaming call that must fail before its handshake."""
    sent: list[object] = []
    error = await _refused(_collect(call, sent))
    assert sent == [], "a refused call sent messages"
    return error


def _assert_clear(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str, text: str = ""
) -> None:
    """The status has ``code`` and ``reason``; its message is short, printable, holds ``text``."""
    details = error.details() or ""
    assert error.code() is code, details
    assert _reason(error) == reason, details
    assert text in details
    assert details.isprintable(), details  # control characters are escaped
    assert len(details) <= MESSAGE_MAX_CHARS, details[:MESSAGE_MAX_CHARS]


# -- §6.1-9: stream names -----------------------------------------------------------------------

#: Names no stream can have (§6.1-8), with what the refusal says.
BAD_NAMES: Final[dict[str, tuple[str, str]]] = {
    # §6.1 path traversal
    "traversal": ("../../etc/x", "'/'"),
    "traversal-short": ("../x", "'/'"),
    # §6.2 separators
    "slash": ("a/b", "'/'"),
    "backslash": ("a\\b", "'/'"),
    # §6.3 dot names
    "dot": (".", "'.'"),
    "dot-dot": ("..", "'.'"),
    "hidden": (".x", "'.'"),
    # §6.4 absolute paths
    "absolute": ("/tmp/x", "'/'"),  # noqa: S108 -- a name that must never become a path
    # §6.5 NUL and control characters (the forged log line is checked separately below)
    "nul": ("a\x00b", "a\\x00b"),
    "newline": ("a\nb", "a\\nb"),
    "escape": ("a\x1b[31mred", "a\\x1b[31mred"),
    # §6.6 empty
    "empty": ("", "empty"),
    # §6.7 over the cap, long before NAME_MAX
    "long-250": ("n" * 250, "over the limit of 249"),
    "long-256": ("n" * 256, "over the limit of 249"),
    "long-1mib": ("n" * RECORD_MAX_BYTES, "over the limit of 249"),
    # §6.8 outside the allowlist [A-Za-z0-9._-]
    "non-ascii": ("café", "only ASCII"),
    "homoglyph": ("\u0455tream", "only ASCII"),  # Cyrillic dze looks like "s"
    "bidi-override": ("abc\u202edef", "only ASCII"),
    "zero-width": ("ab\u200bc", "only ASCII"),
    "space": ("a b", "only ASCII"),
}

#: Reserved names (§6.9): everything starting with "__", internal streams included.
RESERVED_NAMES: Final = ("__cursors", "__activity", "__x", "__")


def _admin_calls(api: API, name: str) -> dict[str, Awaitable[object]]:
    """Every RPC that creates, deletes or changes a stream by name."""
    return {
        "CreateStream": api.CreateStream(
            api_pb2.CreateStreamRequest(name=name, subject="ok.subject"), timeout=TIMEOUT_S
        ),
        "DeleteStream": api.DeleteStream(api_pb2.DeleteStreamRequest(name=name), timeout=TIMEOUT_S),
        "PauseStream": api.PauseStream(api_pb2.PauseStreamRequest(name=name), timeout=TIMEOUT_S),
        "SetStreamReadonly": api.SetStreamReadonly(
            api_pb2.SetStreamReadonlyRequest(name=name, readonly=True), timeout=TIMEOUT_S
        ),
    }


@pytest.mark.parametrize(("name", "text"), list(BAD_NAMES.values()), ids=list(BAD_NAMES))
async def test_bad_names_are_refused_everywhere_and_reach_nothing(  # §6.1-8
    api: API, shared: BrokerProcess, name: str, text: str
) -> None:
    async with _unchanged(api, shared):
        for rpc, call in _admin_calls(api, name).items():
            error = await _refused(call)
            _assert_clear(error, INVALID, "invalid-argument", text)
            assert "stream name" in (error.details() or ""), rpc
        # Reads and publishes look the name up: unknown, never a path.
        cursor = await _refused(
            api.SetCursor(
                api_pb2.SetCursorRequest(stream=name, cursorId="c", offset=0), timeout=TIMEOUT_S
            )
        )
        _assert_clear(cursor, INVALID, "invalid-argument")
        published = await _refused(
            api.Publish(api_pb2.PublishRequest(stream=name, value=b"v"), timeout=TIMEOUT_S)
        )
        if name:
            _assert_clear(published, NOT_FOUND, "stream-not-found")
        else:
            _assert_clear(published, INVALID, "invalid-argument", "empty")
        partition = await _refused(
            api.FetchPartitionMetadata(
                api_pb2.FetchPartitionMetadataRequest(stream=name), timeout=TIMEOUT_S
            )
        )
        _assert_clear(partition, NOT_FOUND, "partition-not-found", "No such partition")
        subscription = await _stream_refused(
            api.Subscribe(api_pb2.SubscribeRequest(stream=name), timeout=TIMEOUT_S)
        )
        _assert_clear(subscription, NOT_FOUND, "partition-not-found", "No such partition")
    # Nothing in the streams directory but the broker's own streams and valid names.
    for entry in (shared.data_dir / "streams").iterdir():
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", entry.name), entry.name


@pytest.mark.parametrize("name", RESERVED_NAMES)
async def test_reserved_names_are_refused(  # §6.9
    api: API, shared: BrokerProcess, name: str
) -> None:
    # Also test_admin.py::test_bad_create_requests_change_nothing (__cursors) and
    # test_cursors.py::test_the_cursors_stream_cannot_be_deleted_or_created.
    async with _unchanged(api, shared):
        for call in _admin_calls(api, name).values():
            # Liftbridge's exact text for its reserved streams, and Flux's for the rest of "__".
            error = await _refused(call)
            _assert_clear(error, INVALID, "stream-reserved", "Stream is reserved")


async def test_control_characters_never_forge_a_log_line(  # §6.5
    api: API, shared: BrokerProcess
) -> None:
    forged = "2026-01-01 00:00:00,000 ERROR flux_broker: forged"
    names = [f"x\n{forged}", f"x\r{forged}", f"x\x1b[2K\r{forged}", f"x\x00{forged}"]
    async with _unchanged(api, shared):
        for name in names:
            for call in _admin_calls(api, name).values():
                error = await _refused(call)
                _assert_clear(error, INVALID, "invalid-argument", "forged")
            error = await _refused(
                api.Publish(api_pb2.PublishRequest(stream=name, value=b"v"), timeout=TIMEOUT_S)
            )
            _assert_clear(error, NOT_FOUND, "stream-not-found")
            error = await _refused(
                api.PublishToSubject(
                    api_pb2.PublishToSubjectRequest(subject=name, value=b"v"), timeout=TIMEOUT_S
                )
            )
            _assert_clear(error, INVALID, "invalid-argument", "subject")
    # A DEBUG-level broker logged whatever these requests made it log: none of it raw.
    output = shared.output()
    assert not any(line.startswith(forged) for line in output.splitlines())
    assert "\x1b" not in output
    assert "\x00" not in output


# -- §6.10: subjects ----------------------------------------------------------------------------

#: Subjects no stream can have (§6.10). Also test_admin.py (empty, space, "a..b", "a.>" with 2
#: partitions) and test_publish.py::test_bad_publish_to_subject_is_rejected.
BAD_SUBJECTS: Final[dict[str, str]] = {
    "empty": "",
    "space": " ",
    "inner-space": "a b",
    "tab": "a\tb",
    "newline": "a\nb",
    "empty-token": "a..b",
    "leading-dot": ".a",
    "trailing-dot": "a.",
    "lone-dot": ".",
    "star-in-token": "a.b*",
    "gt-in-token": "a.>b",
    "gt-not-last": "a.>.b",
    "nul": "a\x00b",
    "bidi": "a\u202eb",
    "too-long": "a." + "b" * 2000,
}


@pytest.mark.parametrize("subject", list(BAD_SUBJECTS.values()), ids=list(BAD_SUBJECTS))
async def test_bad_subjects_are_refused(  # §6.10
    api: API, shared: BrokerProcess, subject: str
) -> None:
    async with _unchanged(api, shared):
        error = await _refused(
            api.CreateStream(
                api_pb2.CreateStreamRequest(name=_name("subject"), subject=subject),
                timeout=TIMEOUT_S,
            )
        )
        _assert_clear(error, INVALID, "invalid-argument", "subject")
        # As the subject, and as the ack inbox (where empty means "none").
        for to_subject in (subject, "literal.subject") if subject else (subject,):
            inbox = subject if to_subject != subject else ""
            error = await _refused(
                api.PublishToSubject(
                    api_pb2.PublishToSubjectRequest(subject=to_subject, ackInbox=inbox, value=b"v"),
                    timeout=TIMEOUT_S,
                )
            )
            _assert_clear(error, INVALID, "invalid-argument", "subject")


@pytest.mark.parametrize("subject", ["*", "a.*", "a.>", ">", "*.b"])
async def test_wildcards_are_refused_where_a_literal_subject_is_needed(  # §6.10
    api: API, shared: BrokerProcess, subject: str
) -> None:
    stream = _name("literal")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    async with _unchanged(api, shared):
        error = await _refused(
            api.PublishToSubject(
                api_pb2.PublishToSubjectRequest(subject=subject, value=b"v"), timeout=TIMEOUT_S
            )
        )
        _assert_clear(error, INVALID, "invalid-argument", "wildcard")
        error = await _refused(
            api.Publish(
                api_pb2.PublishRequest(stream=stream, ackInbox=subject, value=b"v"),
                timeout=TIMEOUT_S,
            )
        )
        _assert_clear(error, INVALID, "invalid-argument", "ackInbox")


# -- §6.11-13: stream settings ------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [-1, -(2**31), 1025, 1_000_000, 2**31 - 1])
async def test_partition_counts_out_of_range_are_refused(  # §6.11
    api: API, shared: BrokerProcess, partitions: int
) -> None:
    # Also test_admin.py (-1, 5000) and test_limits.py (the configurable cap). 0 means 1:
    # test_admin.py::test_defaults_zero_partitions_and_replication_mean_one.
    async with _unchanged(api, shared):
        error = await _refused(
            api.CreateStream(
                api_pb2.CreateStreamRequest(name=_name("p"), subject="p", partitions=partitions),
                timeout=TIMEOUT_S,
            )
        )
        _assert_clear(error, INVALID, "invalid-argument", f"partitions {partitions} is out")
        assert "1..1024" in (error.details() or "")


@pytest.mark.parametrize("factor", [2, 3, 100, 2**31 - 1, -2, -100, -(2**31)])
async def test_impossible_replication_factors_are_refused(  # §6.12
    api: API, shared: BrokerProcess, factor: int
) -> None:
    # Also test_admin.py (2, -2). 0 means 1 and -1 means every broker (one, here):
    # test_admin.py::test_defaults_zero_partitions_and_replication_mean_one.
    async with _unchanged(api, shared):
        error = await _refused(
            api.CreateStream(
                api_pb2.CreateStreamRequest(
                    name=_name("rf"), subject="rf", replicationFactor=factor
                ),
                timeout=TIMEOUT_S,
            )
        )
        _assert_clear(error, INVALID, "invalid-argument", f"replicationFactor {factor}")


async def test_a_duplicate_name_leaves_the_existing_stream_untouched(  # §6.13
    api: API, shared: BrokerProcess
) -> None:
    # Also test_admin.py::test_duplicate_name_is_already_exists_whatever_the_subject.
    name = _name("dup")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=name, partitions=2), timeout=TIMEOUT_S
    )
    ack = await api.Publish(
        api_pb2.PublishRequest(stream=name, value=b"kept", partition=1), timeout=TIMEOUT_S
    )
    assert ack.ack.offset == 0
    async with _unchanged(api, shared):
        for other in (
            api_pb2.CreateStreamRequest(name=name, subject=name, partitions=2),
            api_pb2.CreateStreamRequest(name=name, subject="other", partitions=5),
            api_pb2.CreateStreamRequest(
                name=name, subject=name, retentionMaxMessages=api_pb2.NullableInt64(value=1)
            ),
        ):
            error = await _refused(api.CreateStream(other, timeout=TIMEOUT_S))
            _assert_clear(error, grpc.StatusCode.ALREADY_EXISTS, "stream-exists")
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=name, partition=1), timeout=TIMEOUT_S
    )
    assert response.metadata.newestOffset == 0


# -- §6.14-18: publishing -----------------------------------------------------------------------

# §6.14 Publish to a stream that does not exist (NOT_FOUND): test_publish.py::
# test_bad_publish_is_rejected_and_stores_nothing ("unknown-stream", with and without a
# deadline), test_publish.py::test_publish_async_errors_do_not_end_the_call (asyncError
# NOT_FOUND), test_publish_batch.py::test_refusals_name_their_row_and_change_nothing
# (stream-not-found).

# §6.15 Partition -1 or past the count (NOT_FOUND, partition-not-found): the same three tests,
# and test_subscribe.py::test_unknown_partition_is_not_found,
# test_admin.py::test_fetch_partition_metadata.

# §6.16, first half: a value over clustering.replication.max.bytes (INVALID_ARGUMENT,
# too-large, nothing appended): test_publish.py (Publish, PublishAsync, PublishToSubject,
# test_ack_error_from_the_leader_becomes_a_status) and test_publish_batch.py (batches).


async def test_a_request_over_the_grpc_limit_is_refused_by_grpc(  # §6.16
    api: API, shared: BrokerProcess
) -> None:
    stream = _name("huge")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    async with _unchanged(api, shared):
        error = await _refused(
            api.Publish(
                api_pb2.PublishRequest(stream=stream, value=bytes(GRPC_RECEIVE_MAX_BYTES)),
                timeout=TIMEOUT_S,
            )
        )
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (error.details() or "")
    # The server is up, and so is this channel.
    ack = await api.Publish(api_pb2.PublishRequest(stream=stream, value=b"v"), timeout=TIMEOUT_S)
    assert ack.ack.offset == 0


def _with_header_key(request: bytes, key: bytes, field: int) -> bytes:
    """``request`` plus a header map entry whose key is ``key``, however invalid."""
    entry = bytes([0x0A, len(key)]) + key + bytes([0x12, 1]) + b"v"
    return request + bytes([field << 3 | 2, len(entry)]) + entry


def _raw_unary(channel: grpc.aio.Channel, method: str) -> Callable[..., Any]:
    identity: Callable[[bytes], bytes] = bytes
    return channel.unary_unary(
        f"/proto.API/{method}", request_serializer=identity, response_deserializer=identity
    )


async def test_header_abuse_is_refused(api: API, shared: BrokerProcess) -> None:  # §6.17
    # Also test_publish.py (1025 headers, a 1025-byte name) and test_limits.py (the caps).
    stream = _name("headers")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    cases: dict[str, tuple[dict[str, bytes], str]] = {
        "10,000 headers": ({f"h{i}": b"" for i in range(10_000)}, "10000 headers"),
        "1 MiB name": ({"k" * (RECORD_MAX_BYTES - 1024): b""}, "header name"),
        "64 KiB values": ({"a": bytes(40_000), "b": bytes(40_000)}, "headers are"),
    }
    async with _unchanged(api, shared):
        for headers, text in cases.values():
            error = await _refused(
                api.Publish(
                    api_pb2.PublishRequest(stream=stream, headers=headers), timeout=TIMEOUT_S
                )
            )
            _assert_clear(error, INVALID, "invalid-argument", text)
            error = await _refused(
                api.PublishToSubject(
                    api_pb2.PublishToSubjectRequest(subject=stream, headers=headers),
                    timeout=TIMEOUT_S,
                )
            )
            _assert_clear(error, INVALID, "invalid-argument", text)
        # Keys that are not UTF-8 cannot even be decoded (proto3 strings are UTF-8).
        async with grpc.aio.insecure_channel(shared.address) as channel:
            for method, request, field in (
                ("Publish", api_pb2.PublishRequest(stream=stream), 5),
                ("PublishToSubject", api_pb2.PublishToSubjectRequest(subject=stream), 4),
            ):
                raw = _with_header_key(request.SerializeToString(), b"\xff\xfe", field)
                error = await _refused(_raw_unary(channel, method)(raw, timeout=TIMEOUT_S))
                _assert_clear(error, INVALID, "invalid-argument", "UTF-8")
    ack = await api.Publish(
        api_pb2.PublishRequest(stream=stream, headers={"ok": b"1"}), timeout=TIMEOUT_S
    )
    assert ack.ack.offset == 0


# §6.18 Undefined enum numbers (INVALID_ARGUMENT): ackPolicy in test_publish.py
# (Publish "undefined-ack-policy", PublishAsync "bad-policy", PublishToSubject "bad-policy"),
# test_publish_batch.py ("policy"); start and stop positions in test_subscribe.py::
# test_bad_request_is_invalid_argument and test_subscribe_batch.py::
# test_bad_requests_fail_before_the_handshake.


# -- §6.19-21: garbage --------------------------------------------------------------------------

#: Bodies that are not a protobuf message of any kind (§6.19).
GARBAGE_BODIES: Final[dict[str, bytes]] = {
    "truncated-varint": b"\xff\xff\xff",
    "truncated-length": b"\x0a\x05ab",
    "bad-wire-type": b"\x0f\x00",
    "field-zero": b"\x00\x01",
    "huge-length": b"\x0a\xff\xff\xff\xff\x0f",
    "end-group": b"\x0c",
}
#: (method, kind) for every method the garbage goes to.
RAW_METHODS: Final = (
    ("CreateStream", "unary"),
    ("DeleteStream", "unary"),
    ("FetchMetadata", "unary"),
    ("Publish", "unary"),
    ("PublishToSubject", "unary"),
    ("SetCursor", "unary"),
    ("Subscribe", "server-streaming"),
    ("SubscribeBatch", "server-streaming"),
    ("PublishAsync", "bidi"),
    ("PublishBatch", "bidi"),
)


async def _raw_call(channel: grpc.aio.Channel, method: str, kind: str, body: bytes) -> None:
    """Send ``body`` as the (one) request of ``method``, read everything it answers."""
    identity: Callable[[bytes], bytes] = bytes
    path = f"/proto.API/{method}"
    if kind == "unary":
        call = channel.unary_unary(
            path, request_serializer=identity, response_deserializer=identity
        )
        await call(body, timeout=TIMEOUT_S)
        return
    if kind == "server-streaming":
        stream = channel.unary_stream(
            path, request_serializer=identity, response_deserializer=identity
        )
        async for _ in stream(body, timeout=TIMEOUT_S):
            pass
        return

    async def one() -> AsyncIterator[bytes]:
        yield body

    bidi = channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)
    async for _ in bidi(one(), timeout=TIMEOUT_S):
        pass


@pytest.mark.parametrize("body", list(GARBAGE_BODIES.values()), ids=list(GARBAGE_BODIES))
async def test_garbage_protobuf_bodies_are_invalid_argument(  # §6.19
    api: API, shared: BrokerProcess, body: bytes
) -> None:
    async with _unchanged(api, shared), grpc.aio.insecure_channel(shared.address) as channel:
        for method, kind in RAW_METHODS:
            error = await _refused(_raw_call(channel, method, kind, body))
            _assert_clear(error, INVALID, "invalid-argument", "not a valid protobuf message")
            assert "Traceback" not in (error.details() or ""), method
        # The same channel still works.
        await api_pb2_grpc.APIStub(channel).FetchMetadata(
            api_pb2.FetchMetadataRequest(), timeout=TIMEOUT_S
        )
    assert "DecodeError" not in shared.output()  # no traceback per garbage request


async def test_garbage_after_good_requests_ends_the_stream_once_they_are_handled(  # §6.19
    api: API, shared: BrokerProcess
) -> None:
    stream = _name("garbage-batch")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    good = api_pb2.PublishBatchRequest(stream=stream, records=_framed(b"good"), ackPolicy=LEADER)
    identity: Callable[[bytes], bytes] = bytes

    async def requests() -> AsyncIterator[bytes]:
        yield good.SerializeToString()
        yield b"\xff\xff\xff"
        yield good.SerializeToString()  # never read

    async with grpc.aio.insecure_channel(shared.address) as channel:
        call = channel.stream_stream(
            "/proto.API/PublishBatch", request_serializer=identity, response_deserializer=identity
        )(requests(), timeout=TIMEOUT_S)
        raw: list[bytes] = []
        error = await _refused(_collect(call, raw))
    _assert_clear(error, INVALID, "invalid-argument", "not a valid protobuf message")
    responses = [api_pb2.PublishBatchResponse.FromString(response) for response in raw]
    assert [(r.baseOffset, r.HasField("error")) for r in responses] == [(0, False)]
    metadata = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=stream), timeout=TIMEOUT_S
    )
    assert metadata.metadata.newestOffset == 0


def _framed(*values: bytes) -> bytes:
    data, _ = frame(
        [NewRecord(value=v) for v in values], Placement(0, 0, 0, 0, 0), 1 << 30, 1 << 30
    )
    return bytes(data)


def _garbage(seed: int, size: int) -> bytes:
    """``size`` fixed pseudo-random bytes: the same garbage in every run."""
    return random.Random(seed).randbytes(size)  # noqa: S311 -- test data, not a secret


#: What arrives on the gRPC port instead of HTTP/2 (§6.20).
_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RAW_GARBAGE: Final[dict[str, bytes]] = {
    "http1": b"GET / HTTP/1.1\r\nHost: flux\r\n\r\n",
    "random": _garbage(20, 4096),
    "zeros": bytes(1024),
    "bad-preface": b"PRI * HTTP/9.9\r\n\r\nXX\r\n\r\n",
    "preface-then-truncated-frame": _PREFACE + b"\x00\x00\x12\x04",
    "preface-then-huge-frame": _PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + bytes(64),
    "preface-then-garbage": _PREFACE + _garbage(21, 1024),
}


@pytest.mark.parametrize("garbage", list(RAW_GARBAGE.values()), ids=list(RAW_GARBAGE))
async def test_raw_garbage_on_the_grpc_port_closes_that_connection_only(  # §6.20
    api: API, shared: BrokerProcess, garbage: bytes
) -> None:
    stream = _name("raw")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    # Another client, mid-subscription, must not notice.
    subscription = api.Subscribe(api_pb2.SubscribeRequest(stream=stream), timeout=TIMEOUT_S * 3)
    assert await subscription.read() == api_pb2.Message()  # the handshake
    host, port = shared.address.rsplit(":", 1)
    async with _unchanged(api, shared):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(garbage)
            await writer.drain()
            writer.write_eof()  # a truncated frame stays truncated
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(TIMEOUT_S):
                    # The broker answers (at most a SETTINGS and a GOAWAY frame) and closes.
                    received = await reader.read(1 << 20)
                    while received:
                        assert b"Traceback" not in received
                        received = await reader.read(1 << 20)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    ack = await api.Publish(api_pb2.PublishRequest(stream=stream, value=b"v"), timeout=TIMEOUT_S)
    message = await asyncio.wait_for(subscription.read(), TIMEOUT_S)
    assert isinstance(message, api_pb2.Message)
    assert (message.offset, message.value) == (ack.ack.offset, b"v")
    subscription.cancel()
    assert "Traceback" not in shared.output()


def _with_crc(msg_type: int, payload: bytes, crc: int) -> bytes:
    return HEADER.pack(MAGIC, 0, 12, 1, msg_type) + CRC.pack(crc) + payload


#: Payloads on a stream's subject that are not a valid PUBLISH envelope (§6.21). Each is
#: stored as the raw value (DESIGN.md §4.2, as Liftbridge does) and counted as malformed.
FORGED_ENVELOPES: Final[dict[str, bytes]] = {
    "empty": b"",
    "magic-only": MAGIC,
    "short-header": MAGIC + b"\x00\x08",
    "bad-magic": b"\xb9\x0e\x43\xb5\x00\x08\x00\x00" + b"payload",
    "wrong-version": HEADER.pack(MAGIC, 1, 8, 0, 0) + b"payload",
    "header-length-below-8": HEADER.pack(MAGIC, 0, 4, 0, 0) + b"payload",
    "header-length-past-end": HEADER.pack(MAGIC, 0, 255, 0, 0) + b"payload",
    "crc-flag-without-crc": HEADER.pack(MAGIC, 0, 8, 1, 0) + b"payload",
    "crc-mismatch": _with_crc(0, api_pb2.Message(value=b"x").SerializeToString(), 0xDEADBEEF),
    "ack-type": encode_ack(api_pb2.Ack(stream="forged", offset=99)),
    "internal-type": encode(MessageType.REPLICATION_REQUEST, b"\x08\x01"),
    "unknown-type": HEADER.pack(MAGIC, 0, 8, 0, 200) + b"payload",
    "bad-protobuf": HEADER.pack(MAGIC, 0, 8, 0, 0) + b"\xff\xff\xff",
    "bad-protobuf-utf8": HEADER.pack(MAGIC, 0, 8, 0, 0) + b"\x3a\x02\xff\xfe",
    "random": _garbage(22, 512),
}


async def _read_values(api: API, stream: str, count: int) -> list[api_pb2.Message]:
    """The first ``count`` records of ``stream`` (from the start), once they are committed."""

    async def committed() -> bool:
        response = await api.FetchPartitionMetadata(
            api_pb2.FetchPartitionMetadataRequest(stream=stream), timeout=TIMEOUT_S
        )
        return response.metadata.highWatermark >= count - 1

    await wait_for(committed, TIMEOUT_S, message=f"{count} records in {stream}")
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream=stream,
            startPosition=api_pb2.EARLIEST,
            stopPosition=api_pb2.STOP_OFFSET,
            stopOffset=count - 1,
        ),
        timeout=TIMEOUT_S,
    )
    return await _until_stopped(call)


async def _until_stopped(call: AsyncIterable[api_pb2.Message]) -> list[api_pb2.Message]:
    """The records a subscription delivers (after its handshake) until it reaches its stop."""
    messages: list[api_pb2.Message] = []
    error = await _refused(_collect(call, messages))
    _assert_clear(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "stop-reached")
    assert messages[0] == api_pb2.Message()  # the handshake
    return messages[1:]


async def test_forged_envelopes_on_a_stream_subject_are_stored_raw(  # §6.21
    api: API, shared: BrokerProcess
) -> None:
    # Also test_publish.py::test_raw_nats_payload_is_stored.
    stream = _name("forged")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    inbox = f"forged.inbox.{uuid.uuid4().hex}"
    valid = encode_message(
        api_pb2.Message(offset=-1, value=b"valid", ackInbox=inbox, ackPolicy=LEADER),
        crc=True,
    )
    async with _nats(shared) as nc:
        acks = await nc.subscribe(inbox)
        for payload in FORGED_ENVELOPES.values():
            await nc.publish(stream, payload)
        await nc.publish(stream, valid)
        ack_data = (await acks.next_msg(timeout=TIMEOUT_S)).data
    stored = await _read_values(api, stream, len(FORGED_ENVELOPES) + 1)
    assert [m.value for m in stored] == [*FORGED_ENVELOPES.values(), b"valid"]
    # Stored raw: no key, no ack, only the headers the broker adds.
    assert all(not m.key and set(m.headers) == {"subject", "reply"} for m in stored[:-1])
    ack = decode_ack(ack_data)
    assert (ack.stream, ack.offset) == (stream, len(FORGED_ENVELOPES))
    assert "Traceback" not in shared.output()


async def test_forged_acks_on_ack_inboxes_break_nothing(  # §6.21
    api: API, shared: BrokerProcess
) -> None:
    stream = _name("acks")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream), timeout=TIMEOUT_S
    )
    first = await api.Publish(api_pb2.PublishRequest(stream=stream, value=b"a"), timeout=TIMEOUT_S)
    # The broker's own inbox space (one subscription for every unary Publish), an inbox a
    # call used, a client-chosen inbox a PublishToSubject waits on, and any subject.
    own = first.ack.ackInbox
    client_inbox = f"client.{uuid.uuid4().hex}"
    subjects = [own, own.rsplit(".", 1)[0] + ".unknown", client_inbox]
    forged = [
        *FORGED_ENVELOPES.values(),
        encode_ack(api_pb2.Ack(stream=stream, offset=7, correlationId="forged")),
        encode_message(api_pb2.Message(value=b"not an ack")),
    ]

    async with _nats(shared) as nc:

        async def forge() -> None:
            for subject in subjects:
                for payload in forged:
                    await nc.publish(subject, payload)
            await nc.flush()

        # Nothing acks on this subject: the call waits on its inbox, with garbage arriving.
        waiting = asyncio.ensure_future(
            api.PublishToSubject(
                api_pb2.PublishToSubjectRequest(
                    subject=f"nobody.{uuid.uuid4().hex}",
                    ackInbox=client_inbox,
                    correlationId="mine",
                ),
                timeout=1.5,
            )
        )
        while not waiting.done():
            await forge()
            await asyncio.wait([waiting], timeout=0.05)
        error = await _refused(waiting)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # The broker answers just before the deadline, so its reason usually arrives first.
        assert _reason(error) in {"ack-timeout", ""}
    second = await api.Publish(api_pb2.PublishRequest(stream=stream, value=b"b"), timeout=TIMEOUT_S)
    assert second.ack.offset == 1
    assert "Traceback" not in shared.output()


# -- §6.22-23: subscribe positions --------------------------------------------------------------


async def _stream_with(api: API, broker: BrokerProcess, values: list[bytes], **fields: Any) -> str:
    stream = _name("positions")
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=stream, subject=stream, **fields), timeout=TIMEOUT_S
    )
    async with _nats(broker) as nc:
        for value in values:
            await nc.publish(stream, value)
        await nc.flush()
    if values:
        await _read_values(api, stream, len(values))
    return stream


async def test_a_negative_start_offset_starts_at_the_oldest(  # §6.22
    api: API, shared: BrokerProcess
) -> None:
    # DESIGN.md §4: Liftbridge clamps a negative start offset to 0 (the plan's
    # INVALID_ARGUMENT yields to it). An offset past newest + 1 waits there:
    # test_subscribe.py::test_offset_beyond_the_end_skips_to_it.
    stream = await _stream_with(api, shared, [b"v0", b"v1"])
    for offset in (-1, -5, -(2**63)):
        call = api.Subscribe(
            api_pb2.SubscribeRequest(
                stream=stream,
                startPosition=api_pb2.OFFSET,
                startOffset=offset,
                stopPosition=api_pb2.STOP_LATEST,
            ),
            timeout=TIMEOUT_S,
        )
        delivered = await _until_stopped(call)
        assert [(m.offset, m.value) for m in delivered] == [(0, b"v0"), (1, b"v1")]
        batches = api.SubscribeBatch(
            api_pb2.SubscribeBatchRequest(
                subscribe=api_pb2.SubscribeRequest(
                    stream=stream, startPosition=api_pb2.OFFSET, startOffset=offset
                )
            ),
            timeout=TIMEOUT_S,
        )
        handshake, batch = await batches.read(), await batches.read()
        assert isinstance(handshake, api_pb2.RecordBatch)
        assert isinstance(batch, api_pb2.RecordBatch)
        assert (handshake.firstOffset, batch.firstOffset, batch.lastOffset) == (-1, 0, 1)
        batches.cancel()


@pytest.mark.parametrize("timestamp", [0, -1, -(2**63)], ids=["zero", "negative", "most-negative"])
async def test_start_timestamps_before_every_record_start_at_the_oldest(  # §6.23
    api: API, shared: BrokerProcess, timestamp: int
) -> None:
    stream = await _stream_with(api, shared, [b"v0", b"v1"])
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream=stream,
            startPosition=api_pb2.TIMESTAMP,
            startTimestamp=timestamp,
            stopPosition=api_pb2.STOP_LATEST,
        ),
        timeout=TIMEOUT_S,
    )
    delivered = await _until_stopped(call)
    assert [m.value for m in delivered] == [b"v0", b"v1"]


@pytest.mark.parametrize("timestamp", [0, -1, 2**63 - 1], ids=["zero", "negative", "far-future"])
async def test_start_timestamps_on_an_empty_stream_wait_for_records(  # §6.23
    api: API, shared: BrokerProcess, timestamp: int
) -> None:
    # A start timestamp after every record: test_subscribe.py::
    # test_start_timestamp_after_all_waits_for_new.
    stream = await _stream_with(api, shared, [])
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream=stream, startPosition=api_pb2.TIMESTAMP, startTimestamp=timestamp
        ),
        timeout=TIMEOUT_S,
    )
    assert await call.read() == api_pb2.Message()  # the handshake, not an error
    async with _nats(shared) as nc:
        await nc.publish(stream, b"first")
        await nc.flush()
    message = await call.read()
    assert isinstance(message, api_pb2.Message)
    assert (message.offset, message.value) == (0, b"first")
    call.cancel()
    # With a stop, an empty stream is the documented STREAM_EMPTY, never INTERNAL "EOF".
    stream = await _stream_with(api, shared, [])
    error = await _stream_refused(
        api.Subscribe(
            api_pb2.SubscribeRequest(
                stream=stream,
                startPosition=api_pb2.TIMESTAMP,
                startTimestamp=timestamp,
                stopPosition=api_pb2.STOP_LATEST,
            ),
            timeout=TIMEOUT_S,
        )
    )
    _assert_clear(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "stream-empty", "Stream is empty")


async def test_start_timestamps_on_an_expired_stream_start_at_the_oldest_kept(  # §6.23
    api: API, shared: BrokerProcess
) -> None:
    # One record per segment (each published alone), one message retained, the cleaner every
    # 10 ms: the older records expire while the stream is read.
    stream = await _stream_with(
        api,
        shared,
        [],
        segmentMaxBytes=api_pb2.NullableInt64(value=1),
        retentionMaxMessages=api_pb2.NullableInt64(value=1),
        cleanerInterval=api_pb2.NullableInt64(value=10),
    )
    for value in (b"v0", b"v1", b"v2"):
        await api.Publish(
            api_pb2.PublishRequest(stream=stream, value=value, ackPolicy=api_pb2.AckPolicy.ALL),
            timeout=TIMEOUT_S,
        )

    async def oldest() -> int | None:
        call = api.Subscribe(
            api_pb2.SubscribeRequest(
                stream=stream,
                startPosition=api_pb2.TIMESTAMP,
                startTimestamp=0,
                stopPosition=api_pb2.STOP_LATEST,
            ),
            timeout=TIMEOUT_S,
        )
        delivered = await _until_stopped(call)
        first = delivered[0].offset
        return first if first == 2 else None

    assert await wait_for(oldest, TIMEOUT_S, message="records 0 and 1 expired") == 2


# -- §6.26: deadlines ---------------------------------------------------------------------------

# §6.26 A Publish whose deadline already passed is DEADLINE_EXCEEDED and publishes nothing:
# test_publish.py::test_expired_deadline_publishes_nothing. A Publish without a deadline is
# fire-and-forget (DESIGN.md §4) but never a silent drop: the record is stored
# (test_publish.py::test_publish_without_deadline_is_fire_and_forget_yet_stored), and a bad
# request still gets its error (test_publish.py::test_bad_publish_is_rejected_and_stores_nothing,
# every case also without a deadline).
