"""Guard Flux's public gRPC API against wire drift from Liftbridge API v1.9.0.

Flux promises that an application written against an existing Liftbridge client (Go, Python,
Java) works against a Flux broker unchanged. On the wire that promise is a set of numbers and
types: the service and method paths (``/proto.API/<Method>``), the streaming shape of each RPC,
every field's number, type and label, and every enum value. Clients also rely on the field and
value names (JSON, reflection, generated accessors), so those are pinned as well.

This module keeps the v1.9.0 API as plain Python data (``LIFTBRIDGE_RPCS``,
``LIFTBRIDGE_MESSAGES``, ``LIFTBRIDGE_ENUMS``) and compares the compiled ``flux_proto`` descriptor
with it through :func:`wire_differences`. The facts come from the shared reference
``reference/liftbridge-api.md`` §1, cross-checked against Liftbridge's own ``api.proto``
(``liftbridge-io/liftbridge-api``, v1.9.0 era, with consumer groups) and against the descriptor
that gufo-liftbridge 0.2.0 generated from it. The table is written independently of
``proto/src/flux_proto/api.proto`` on purpose: it is a second source of truth, not a copy.

What counts as a difference (Flux extensions that Liftbridge clients never see are allowed):

* the proto package is not ``proto`` or the file is not proto3;
* service ``API`` lacks one of the 16 Liftbridge RPCs, one differs in input type, output type or
  streaming, or they are not declared in Liftbridge's relative order (extra RPCs may sit anywhere);
* a Liftbridge message or enum is missing;
* a Liftbridge field differs in name, number, type, type name, label or map-ness, sits in a
  oneof, or any field of a Liftbridge message is proto3 ``optional``;
* a Liftbridge message has a field numbered below 1000 that Liftbridge does not define;
* a Liftbridge enum gains, loses, renames or renumbers a value;
* ``SubscribeRequest`` does not reserve field 12, or uses it (newer Liftbridge servers put their
  ``reverse`` flag there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final, NamedTuple

import pytest
from google.protobuf import descriptor_pb2

from flux_proto import api_pb2

FileDescriptorProto = descriptor_pb2.FileDescriptorProto
DescriptorProto = descriptor_pb2.DescriptorProto
EnumDescriptorProto = descriptor_pb2.EnumDescriptorProto
FieldDescriptorProto = descriptor_pb2.FieldDescriptorProto
MethodDescriptorProto = descriptor_pb2.MethodDescriptorProto

PACKAGE: Final = "proto"
SERVICE: Final = "API"
SYNTAX: Final = "proto3"
# Fields Flux adds to a Liftbridge message start here, far above anything Liftbridge will use.
EXTENSION_FIELD_MIN: Final = 1000
# Newer Liftbridge servers (v26.x) use SubscribeRequest field 12 for `reverse`.
SUBSCRIBE_RESERVED_FIELD: Final = 12

OPTIONAL: Final = "optional"
REPEATED: Final = "repeated"


class Rpc(NamedTuple):
    """One method of service ``proto.API`` as Liftbridge declares it."""

    name: str
    input_type: str
    output_type: str
    client_streaming: bool = False
    server_streaming: bool = False


class Field(NamedTuple):
    """One field of a Liftbridge message.

    ``type`` is a scalar name (``"int64"``), a fully qualified message or enum name
    (``".proto.NullableInt64"``) or a map (``"map<string, bytes>"``, which protobuf encodes as a
    repeated entry message, hence labelled ``repeated``).
    """

    number: int
    name: str
    type: str
    label: str = OPTIONAL


# The 16 RPCs of service proto.API in Liftbridge's declaration order (reference §1.1).
LIFTBRIDGE_RPCS: Final[tuple[Rpc, ...]] = (
    Rpc("CreateStream", ".proto.CreateStreamRequest", ".proto.CreateStreamResponse"),
    Rpc("DeleteStream", ".proto.DeleteStreamRequest", ".proto.DeleteStreamResponse"),
    Rpc("PauseStream", ".proto.PauseStreamRequest", ".proto.PauseStreamResponse"),
    Rpc("SetStreamReadonly", ".proto.SetStreamReadonlyRequest", ".proto.SetStreamReadonlyResponse"),
    Rpc("Subscribe", ".proto.SubscribeRequest", ".proto.Message", server_streaming=True),
    Rpc("FetchMetadata", ".proto.FetchMetadataRequest", ".proto.FetchMetadataResponse"),
    Rpc(
        "FetchPartitionMetadata",
        ".proto.FetchPartitionMetadataRequest",
        ".proto.FetchPartitionMetadataResponse",
    ),
    Rpc("Publish", ".proto.PublishRequest", ".proto.PublishResponse"),
    Rpc(
        "PublishAsync",
        ".proto.PublishRequest",
        ".proto.PublishResponse",
        client_streaming=True,
        server_streaming=True,
    ),
    Rpc("PublishToSubject", ".proto.PublishToSubjectRequest", ".proto.PublishToSubjectResponse"),
    Rpc("SetCursor", ".proto.SetCursorRequest", ".proto.SetCursorResponse"),
    Rpc("FetchCursor", ".proto.FetchCursorRequest", ".proto.FetchCursorResponse"),
    Rpc("JoinConsumerGroup", ".proto.JoinConsumerGroupRequest", ".proto.JoinConsumerGroupResponse"),
    Rpc(
        "LeaveConsumerGroup",
        ".proto.LeaveConsumerGroupRequest",
        ".proto.LeaveConsumerGroupResponse",
    ),
    Rpc(
        "FetchConsumerGroupAssignments",
        ".proto.FetchConsumerGroupAssignmentsRequest",
        ".proto.FetchConsumerGroupAssignmentsResponse",
    ),
    Rpc(
        "ReportConsumerGroupCoordinator",
        ".proto.ReportConsumerGroupCoordinatorRequest",
        ".proto.ReportConsumerGroupCoordinatorResponse",
    ),
)

# Every Liftbridge message, keyed by its name inside package `proto`. An empty tuple is a
# message Liftbridge leaves empty (Flux may still add fields numbered >= 1000).
LIFTBRIDGE_MESSAGES: Final[dict[str, tuple[Field, ...]]] = {
    # §1.2 Wrappers that tell "unset" from zero.
    "NullableInt64": (Field(1, "value", "int64"),),
    "NullableInt32": (Field(1, "value", "int32"),),
    "NullableBool": (Field(1, "value", "bool"),),
    # §1.3 Stream administration. (Liftbridge API <= v1.2 spelled fields 6-13 with a capital
    # letter, e.g. `RetentionMaxBytes`; v1.9.0 uses lower camel case.)
    "CreateStreamRequest": (
        Field(1, "subject", "string"),
        Field(2, "name", "string"),
        Field(3, "group", "string"),
        Field(4, "replicationFactor", "int32"),
        Field(5, "partitions", "int32"),
        Field(6, "retentionMaxBytes", ".proto.NullableInt64"),
        Field(7, "retentionMaxMessages", ".proto.NullableInt64"),
        Field(8, "retentionMaxAge", ".proto.NullableInt64"),
        Field(9, "cleanerInterval", ".proto.NullableInt64"),
        Field(10, "segmentMaxBytes", ".proto.NullableInt64"),
        Field(11, "segmentMaxAge", ".proto.NullableInt64"),
        Field(12, "compactMaxGoroutines", ".proto.NullableInt32"),
        Field(13, "compactEnabled", ".proto.NullableBool"),
        Field(14, "autoPauseTime", ".proto.NullableInt64"),
        Field(15, "autoPauseDisableIfSubscribers", ".proto.NullableBool"),
        Field(16, "minIsr", ".proto.NullableInt32"),
        Field(17, "optimisticConcurrencyControl", ".proto.NullableBool"),
        Field(18, "encryption", ".proto.NullableBool"),
    ),
    "CreateStreamResponse": (),
    "DeleteStreamRequest": (Field(1, "name", "string"),),
    "DeleteStreamResponse": (),
    "PauseStreamRequest": (
        Field(1, "name", "string"),
        Field(2, "partitions", "int32", REPEATED),
        Field(3, "resumeAll", "bool"),
    ),
    "PauseStreamResponse": (),
    "SetStreamReadonlyRequest": (
        Field(1, "name", "string"),
        Field(2, "partitions", "int32", REPEATED),
        Field(3, "readonly", "bool"),
    ),
    "SetStreamReadonlyResponse": (),
    # §1.4 Subscribe.
    "Consumer": (
        Field(1, "groupId", "string"),
        Field(2, "groupEpoch", "uint64"),
        Field(3, "consumerId", "string"),
    ),
    "SubscribeRequest": (
        Field(1, "stream", "string"),
        Field(2, "partition", "int32"),
        Field(3, "startPosition", ".proto.StartPosition"),
        Field(4, "startOffset", "int64"),
        Field(5, "startTimestamp", "int64"),
        Field(6, "readISRReplica", "bool"),
        Field(7, "resume", "bool"),
        Field(8, "stopPosition", ".proto.StopPosition"),
        Field(9, "stopOffset", "int64"),
        Field(10, "stopTimestamp", "int64"),
        Field(11, "consumer", ".proto.Consumer"),
        # 12 is reserved, see SUBSCRIBE_RESERVED_FIELD.
    ),
    "Message": (
        Field(1, "offset", "int64"),
        Field(2, "key", "bytes"),
        Field(3, "value", "bytes"),
        Field(4, "timestamp", "int64"),
        Field(5, "stream", "string"),
        Field(6, "partition", "int32"),
        Field(7, "subject", "string"),
        Field(8, "replySubject", "string"),
        Field(9, "headers", "map<string, bytes>", REPEATED),
        Field(10, "ackInbox", "string"),
        Field(11, "correlationId", "string"),
        Field(12, "ackPolicy", ".proto.AckPolicy"),
    ),
    # §1.5 Metadata.
    "FetchMetadataRequest": (
        Field(1, "streams", "string", REPEATED),
        Field(2, "groups", "string", REPEATED),
    ),
    "FetchMetadataResponse": (
        Field(1, "brokers", ".proto.Broker", REPEATED),
        # Named `metadata` in API <= v1.2, same number.
        Field(2, "streamMetadata", ".proto.StreamMetadata", REPEATED),
        Field(3, "groupMetadata", ".proto.ConsumerGroupMetadata", REPEATED),
    ),
    "Broker": (
        Field(1, "id", "string"),
        Field(2, "host", "string"),
        Field(3, "port", "int32"),
        Field(4, "partitionCount", "int32"),
        Field(5, "leaderCount", "int32"),
    ),
    "StreamMetadata": (
        Field(1, "name", "string"),
        Field(2, "subject", "string"),
        Field(3, "error", ".proto.StreamMetadata.Error"),
        Field(4, "partitions", "map<int32, .proto.PartitionMetadata>", REPEATED),
        Field(5, "creationTimestamp", "int64"),
    ),
    "PartitionMetadata": (
        Field(1, "id", "int32"),
        Field(2, "leader", "string"),
        Field(3, "replicas", "string", REPEATED),
        Field(4, "isr", "string", REPEATED),
        Field(5, "highWatermark", "int64"),
        Field(6, "newestOffset", "int64"),
        Field(7, "paused", "bool"),
        Field(8, "readonly", "bool"),
        Field(9, "messagesReceivedTimestamps", ".proto.PartitionEventTimestamps"),
        Field(10, "pauseTimestamps", ".proto.PartitionEventTimestamps"),
        Field(11, "readonlyTimestamps", ".proto.PartitionEventTimestamps"),
    ),
    "PartitionEventTimestamps": (
        Field(1, "firstTimestamp", "int64"),
        Field(2, "latestTimestamp", "int64"),
    ),
    "ConsumerGroupMetadata": (
        Field(1, "groupId", "string"),
        Field(2, "error", ".proto.ConsumerGroupMetadata.Error"),
        Field(3, "coordinator", "string"),
        Field(4, "epoch", "uint64"),
    ),
    "FetchPartitionMetadataRequest": (
        Field(1, "stream", "string"),
        Field(2, "partition", "int32"),
    ),
    "FetchPartitionMetadataResponse": (Field(1, "metadata", ".proto.PartitionMetadata"),),
    # §1.6 Publishing.
    "PublishRequest": (
        Field(1, "key", "bytes"),
        Field(2, "value", "bytes"),
        Field(3, "stream", "string"),
        Field(4, "partition", "int32"),
        Field(5, "headers", "map<string, bytes>", REPEATED),
        Field(6, "ackInbox", "string"),
        Field(7, "correlationId", "string"),
        Field(8, "ackPolicy", ".proto.AckPolicy"),
        Field(9, "expectedOffset", "int64"),
    ),
    "PublishAsyncError": (
        Field(1, "code", ".proto.PublishAsyncError.Code"),
        Field(2, "message", "string"),
    ),
    "PublishResponse": (
        Field(1, "ack", ".proto.Ack"),
        Field(2, "asyncError", ".proto.PublishAsyncError"),
        Field(3, "correlationId", "string"),
    ),
    "PublishToSubjectRequest": (
        Field(1, "key", "bytes"),
        Field(2, "value", "bytes"),
        Field(3, "subject", "string"),
        Field(4, "headers", "map<string, bytes>", REPEATED),
        Field(5, "ackInbox", "string"),
        Field(6, "correlationId", "string"),
        Field(7, "ackPolicy", ".proto.AckPolicy"),
    ),
    "PublishToSubjectResponse": (Field(1, "ack", ".proto.Ack"),),
    "Ack": (
        Field(1, "stream", "string"),
        Field(2, "partitionSubject", "string"),
        Field(3, "msgSubject", "string"),
        Field(4, "offset", "int64"),
        Field(5, "ackInbox", "string"),
        Field(6, "correlationId", "string"),
        Field(7, "ackPolicy", ".proto.AckPolicy"),
        Field(8, "receptionTimestamp", "int64"),
        Field(9, "commitTimestamp", "int64"),
        Field(10, "ackError", ".proto.Ack.Error"),
    ),
    # §1.7 Cursors.
    "SetCursorRequest": (
        Field(1, "stream", "string"),
        Field(2, "partition", "int32"),
        Field(3, "cursorId", "string"),
        Field(4, "offset", "int64"),
    ),
    "SetCursorResponse": (),
    "FetchCursorRequest": (
        Field(1, "stream", "string"),
        Field(2, "partition", "int32"),
        Field(3, "cursorId", "string"),
    ),
    "FetchCursorResponse": (Field(1, "offset", "int64"),),
    # §1.8 Consumer groups.
    "JoinConsumerGroupRequest": (
        Field(1, "groupId", "string"),
        Field(2, "consumerId", "string"),
        Field(3, "streams", "string", REPEATED),
    ),
    "JoinConsumerGroupResponse": (
        Field(1, "coordinator", "string"),
        Field(2, "epoch", "uint64"),
        Field(3, "consumerTimeout", "int64"),
        Field(4, "coordinatorTimeout", "int64"),
    ),
    "LeaveConsumerGroupRequest": (
        Field(1, "groupId", "string"),
        Field(2, "consumerId", "string"),
    ),
    "LeaveConsumerGroupResponse": (),
    "FetchConsumerGroupAssignmentsRequest": (
        Field(1, "groupId", "string"),
        Field(2, "consumerId", "string"),
        Field(3, "epoch", "uint64"),
    ),
    "PartitionAssignment": (
        Field(1, "stream", "string"),
        Field(2, "partitions", "int32", REPEATED),
    ),
    "FetchConsumerGroupAssignmentsResponse": (
        Field(1, "epoch", "uint64"),
        Field(2, "assignments", ".proto.PartitionAssignment", REPEATED),
    ),
    "ReportConsumerGroupCoordinatorRequest": (
        Field(1, "groupId", "string"),
        Field(2, "consumerId", "string"),
        Field(3, "coordinator", "string"),
        Field(4, "epoch", "uint64"),
    ),
    "ReportConsumerGroupCoordinatorResponse": (),
    # §1.9 Activity stream.
    "CreateStreamOp": (
        Field(1, "stream", "string"),
        Field(2, "partitions", "int32", REPEATED),
    ),
    "DeleteStreamOp": (Field(1, "stream", "string"),),
    "PauseStreamOp": (
        Field(1, "stream", "string"),
        Field(2, "partitions", "int32", REPEATED),
        Field(3, "resumeAll", "bool"),
    ),
    "ResumeStreamOp": (
        Field(1, "stream", "string"),
        Field(2, "partitions", "int32", REPEATED),
    ),
    "SetStreamReadonlyOp": (
        Field(1, "stream", "string"),
        Field(2, "partitions", "int32", REPEATED),
        Field(3, "readonly", "bool"),
    ),
    "JoinConsumerGroupOp": (
        Field(1, "groupId", "string"),
        Field(2, "consumerId", "string"),
        Field(3, "streams", "string", REPEATED),
    ),
    "LeaveConsumerGroupOp": (
        Field(1, "groupId", "string"),
        Field(2, "consumerId", "string"),
        Field(3, "expired", "bool"),
    ),
    "ActivityStreamEvent": (
        Field(1, "id", "uint64"),
        Field(2, "op", ".proto.ActivityStreamOp"),
        Field(3, "createStreamOp", ".proto.CreateStreamOp"),
        Field(4, "deleteStreamOp", ".proto.DeleteStreamOp"),
        Field(5, "pauseStreamOp", ".proto.PauseStreamOp"),
        Field(6, "resumeStreamOp", ".proto.ResumeStreamOp"),
        Field(7, "setStreamReadonlyOp", ".proto.SetStreamReadonlyOp"),
        Field(8, "joinConsumerGroupOp", ".proto.JoinConsumerGroupOp"),
        Field(9, "leaveConsumerGroupOp", ".proto.LeaveConsumerGroupOp"),
    ),
}

# Every Liftbridge enum (top level and nested), keyed by its name inside package `proto`:
# value name -> number. Liftbridge clients cannot decode a value they do not know, so the set
# of values is closed.
LIFTBRIDGE_ENUMS: Final[dict[str, dict[str, int]]] = {
    "StartPosition": {"NEW_ONLY": 0, "OFFSET": 1, "EARLIEST": 2, "LATEST": 3, "TIMESTAMP": 4},
    "StopPosition": {"STOP_ON_CANCEL": 0, "STOP_OFFSET": 1, "STOP_LATEST": 2, "STOP_TIMESTAMP": 3},
    "AckPolicy": {"LEADER": 0, "ALL": 1, "NONE": 2},
    "ActivityStreamOp": {
        "CREATE_STREAM": 0,
        "DELETE_STREAM": 1,
        "PAUSE_STREAM": 2,
        "RESUME_STREAM": 3,
        "SET_STREAM_READONLY": 4,
        "JOIN_CONSUMER_GROUP": 5,
        "LEAVE_CONSUMER_GROUP": 6,
    },
    "StreamMetadata.Error": {"OK": 0, "UNKNOWN_STREAM": 1},
    "ConsumerGroupMetadata.Error": {"OK": 0, "UNKNOWN_GROUP": 1},
    "PublishAsyncError.Code": {
        "UNKNOWN": 0,
        "BAD_REQUEST": 1,
        "NOT_FOUND": 2,
        "INTERNAL": 3,
        "READONLY": 4,
        "INCORRECT_OFFSET": 5,
        "ENCRYPTION_FAILED": 6,
        "PERMISSION_DENIED": 7,
    },
    "Ack.Error": {"OK": 0, "UNKNOWN": 1, "INCORRECT_OFFSET": 2, "TOO_LARGE": 3, "ENCRYPTION": 4},
}


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


def _qualified(name: str) -> str:
    """Return the descriptor spelling (``.proto.X``) of a name inside the Liftbridge package."""
    return f".{PACKAGE}.{name}"


_TABLE_ENUM_TYPES: Final = frozenset(_qualified(name) for name in LIFTBRIDGE_ENUMS)


def _walk_messages(
    prefix: str, messages: Iterable[DescriptorProto]
) -> Iterator[tuple[str, DescriptorProto]]:
    """Yield ``(full name, message)`` for messages and all their nested messages."""
    for message in messages:
        full_name = f"{prefix}.{message.name}"
        yield full_name, message
        yield from _walk_messages(full_name, message.nested_type)


def _index(
    fdp: FileDescriptorProto,
) -> tuple[dict[str, DescriptorProto], dict[str, EnumDescriptorProto]]:
    """Index every message and enum of ``fdp`` by its fully qualified ``.pkg.Name``."""
    root = f".{fdp.package}" if fdp.package else ""
    messages = dict(_walk_messages(root, fdp.message_type))
    enums = {f"{root}.{enum.name}": enum for enum in fdp.enum_type}
    for full_name, message in messages.items():
        enums.update({f"{full_name}.{enum.name}": enum for enum in message.enum_type})
    return messages, enums


def _render_type(field: FieldDescriptorProto, messages: dict[str, DescriptorProto]) -> str:
    """Spell a field's type the way the table does (``int64``, ``.proto.X``, ``map<K, V>``)."""
    if field.type == FieldDescriptorProto.TYPE_MESSAGE:
        entry = messages.get(field.type_name)
        if entry is not None and entry.options.map_entry:
            by_number = {entry_field.number: entry_field for entry_field in entry.field}
            if 1 in by_number and 2 in by_number:
                key = _render_type(by_number[1], messages)
                value = _render_type(by_number[2], messages)
                return f"map<{key}, {value}>"
        return field.type_name
    if field.type == FieldDescriptorProto.TYPE_ENUM:
        return field.type_name
    return FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()


def _render_label(field: FieldDescriptorProto) -> str:
    """Spell a field's label the way the table does (``optional`` or ``repeated``)."""
    return FieldDescriptorProto.Label.Name(field.label).removeprefix("LABEL_").lower()


def _service_differences(fdp: FileDescriptorProto) -> list[str]:
    """Compare service ``API`` with ``LIFTBRIDGE_RPCS``."""
    where = f"service {PACKAGE}.{SERVICE}"
    services = [service for service in fdp.service if service.name == SERVICE]
    if not services:
        return [f"{where}: missing (Liftbridge clients call /{PACKAGE}.{SERVICE}/<Method>)"]
    methods = {method.name: method for method in services[0].method}
    differences: list[str] = []
    for rpc in LIFTBRIDGE_RPCS:
        rpc_where = f"rpc {PACKAGE}.{SERVICE}/{rpc.name}"
        method = methods.get(rpc.name)
        if method is None:
            differences.append(f"{rpc_where}: missing")
            continue
        actual = Rpc(
            method.name,
            method.input_type,
            method.output_type,
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
        )
        for attribute in ("input_type", "output_type", "client_streaming", "server_streaming"):
            got, expected = getattr(actual, attribute), getattr(rpc, attribute)
            if got != expected:
                differences.append(f"{rpc_where}: {attribute} is {got!r}, expected {expected!r}")
    table_names = {rpc.name for rpc in LIFTBRIDGE_RPCS}
    declared = [method.name for method in services[0].method if method.name in table_names]
    expected_order = [rpc.name for rpc in LIFTBRIDGE_RPCS if rpc.name in methods]
    if declared != expected_order:
        differences.append(
            f"{where}: Liftbridge RPCs declared in the order {declared}, "
            f"expected Liftbridge's order {expected_order}"
        )
    return differences


def _field_differences(
    where: str,
    expected: Field,
    field: FieldDescriptorProto,
    message: DescriptorProto,
    messages: dict[str, DescriptorProto],
) -> list[str]:
    """Compare one descriptor field with the table's field of the same number."""
    what = f"{where}: field {expected.number} {expected.name!r}"
    differences: list[str] = []
    if field.name != expected.name:
        differences.append(f"{what}: named {field.name!r}, expected {expected.name!r}")
    actual_type = _render_type(field, messages)
    if actual_type != expected.type:
        differences.append(f"{what}: type is {actual_type}, expected {expected.type}")
    elif expected.type.startswith("."):
        expected_enum = expected.type in _TABLE_ENUM_TYPES
        if expected_enum != (field.type == FieldDescriptorProto.TYPE_ENUM):
            kind = "an enum" if expected_enum else "a message"
            differences.append(f"{what}: {expected.type} must be {kind}")
    actual_label = _render_label(field)
    if actual_label != expected.label:
        differences.append(f"{what}: label is {actual_label}, expected {expected.label}")
    if field.HasField("oneof_index") and not field.proto3_optional:
        oneof = message.oneof_decl[field.oneof_index].name
        differences.append(f"{what}: must not be inside oneof {oneof!r}")
    return differences


def _message_differences(
    name: str, expected_fields: tuple[Field, ...], messages: dict[str, DescriptorProto]
) -> list[str]:
    """Compare one Liftbridge message with its table entry."""
    where = f"message {PACKAGE}.{name}"
    message = messages.get(_qualified(name))
    if message is None:
        return [f"{where}: missing"]
    differences: list[str] = []
    actual_by_number = {field.number: field for field in message.field}
    for expected in expected_fields:
        field = actual_by_number.get(expected.number)
        if field is None:
            differences.append(
                f"{where}: field {expected.number} {expected.name!r} ({expected.type}) missing"
            )
            continue
        differences += _field_differences(where, expected, field, message, messages)
    expected_numbers = {expected.number for expected in expected_fields}
    for field in message.field:
        what = f"{where}: field {field.number} {field.name!r}"
        if field.proto3_optional:
            differences.append(f"{what}: proto3 `optional` changes presence vs Liftbridge")
        if field.number not in expected_numbers and field.number < EXTENSION_FIELD_MIN:
            differences.append(
                f"{what}: not in Liftbridge v1.9.0; Flux extension fields need numbers "
                f">= {EXTENSION_FIELD_MIN}"
            )
    return differences


def _enum_differences(
    name: str, expected_values: dict[str, int], enums: dict[str, EnumDescriptorProto]
) -> list[str]:
    """Compare one Liftbridge enum with its table entry: same names, same numbers, no extras."""
    where = f"enum {PACKAGE}.{name}"
    enum = enums.get(_qualified(name))
    if enum is None:
        return [f"{where}: missing"]
    actual_values = {value.name: value.number for value in enum.value}
    differences: list[str] = []
    for value_name, number in expected_values.items():
        if value_name not in actual_values:
            differences.append(f"{where}: value {value_name} = {number} missing")
        elif actual_values[value_name] != number:
            differences.append(
                f"{where}: value {value_name} = {actual_values[value_name]}, expected {number}"
            )
    for value_name, number in actual_values.items():
        if value_name not in expected_values:
            differences.append(
                f"{where}: extra value {value_name} = {number} (Liftbridge clients cannot "
                "decode it)"
            )
    return differences


def _subscribe_reserved_differences(messages: dict[str, DescriptorProto]) -> list[str]:
    """Check that ``SubscribeRequest`` keeps Liftbridge's ``reverse`` number free."""
    message = messages.get(_qualified("SubscribeRequest"))
    if message is None:
        return []  # Reported as a missing message already.
    where = f"message {PACKAGE}.SubscribeRequest"
    number = SUBSCRIBE_RESERVED_FIELD
    differences: list[str] = []
    if not any(span.start <= number < span.end for span in message.reserved_range):
        differences.append(
            f"{where}: field number {number} must be reserved (Liftbridge's `reverse`)"
        )
    differences += [
        f"{where}: field {field.number} {field.name!r} uses the number reserved for Liftbridge's "
        "`reverse`"
        for field in message.field
        if field.number == number
    ]
    return differences


def wire_differences(fdp: FileDescriptorProto) -> list[str]:
    """List every way ``fdp`` breaks wire compatibility with Liftbridge API v1.9.0.

    Args:
        fdp: the compiled descriptor of Flux's public API file.

    Returns:
        Human-readable differences, each naming the package, service, RPC, message or enum it
        is about; an empty list means Liftbridge clients see exactly the v1.9.0 API.
    """
    differences: list[str] = []
    if fdp.package != PACKAGE:
        differences.append(f"package is {fdp.package!r}, expected {PACKAGE!r}")
    if fdp.syntax != SYNTAX:
        differences.append(f"file syntax is {fdp.syntax!r}, expected {SYNTAX!r}")
    messages, enums = _index(fdp)
    differences += _service_differences(fdp)
    for name, fields in LIFTBRIDGE_MESSAGES.items():
        differences += _message_differences(name, fields, messages)
    for name, values in LIFTBRIDGE_ENUMS.items():
        differences += _enum_differences(name, values, enums)
    differences += _subscribe_reserved_differences(messages)
    return differences


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture
def flux_descriptor() -> FileDescriptorProto:
    """Flux's compiled API descriptor as plain data (a fresh copy per test)."""
    return FileDescriptorProto.FromString(api_pb2.DESCRIPTOR.serialized_pb)


def _copy(fdp: FileDescriptorProto) -> FileDescriptorProto:
    """Return a deep copy that a mutation may change freely."""
    copied = FileDescriptorProto()
    copied.CopyFrom(fdp)
    return copied


def test_table_is_self_consistent() -> None:
    """The table itself is well formed: unique numbers, known types, closed references."""
    assert len(LIFTBRIDGE_RPCS) == 16
    assert len({rpc.name for rpc in LIFTBRIDGE_RPCS}) == 16
    known_types = {_qualified(name) for name in LIFTBRIDGE_MESSAGES} | _TABLE_ENUM_TYPES
    for rpc in LIFTBRIDGE_RPCS:
        assert {rpc.input_type, rpc.output_type} <= known_types, rpc
    for name, fields in LIFTBRIDGE_MESSAGES.items():
        assert len({field.number for field in fields}) == len(fields), name
        assert len({field.name for field in fields}) == len(fields), name
        for field in fields:
            assert 0 < field.number < EXTENSION_FIELD_MIN, (name, field)
            assert field.label in {OPTIONAL, REPEATED}, (name, field)
            if field.type.startswith("map<"):
                assert field.label == REPEATED, (name, field)
                value_type = field.type.removesuffix(">").split(", ")[1]
                referenced = [value_type] if value_type.startswith(".") else []
            else:
                referenced = [field.type] if field.type.startswith(".") else []
            assert set(referenced) <= known_types, (name, field)
    subscribe_numbers = {field.number for field in LIFTBRIDGE_MESSAGES["SubscribeRequest"]}
    assert SUBSCRIBE_RESERVED_FIELD not in subscribe_numbers
    for name, values in LIFTBRIDGE_ENUMS.items():
        assert 0 in values.values(), name  # proto3 enums open with a zero value.
        assert len(set(values.values())) == len(values), name


def test_flux_api_is_wire_compatible_with_liftbridge(
    flux_descriptor: FileDescriptorProto,
) -> None:
    """Flux's compiled descriptor matches the Liftbridge v1.9.0 table exactly."""
    differences = wire_differences(flux_descriptor)
    assert differences == [], "wire differences from Liftbridge v1.9.0:\n" + "\n".join(differences)


# --- Mutations that must be reported ------------------------------------------------------


def _message(fdp: FileDescriptorProto, name: str) -> DescriptorProto:
    """Find a top-level message by name."""
    return next(message for message in fdp.message_type if message.name == name)


def _field(fdp: FileDescriptorProto, message: str, name: str) -> FieldDescriptorProto:
    """Find a field of a top-level message by name."""
    return next(field for field in _message(fdp, message).field if field.name == name)


def _method(fdp: FileDescriptorProto, name: str) -> MethodDescriptorProto:
    """Find a method of service ``API`` by name."""
    service = next(service for service in fdp.service if service.name == SERVICE)
    return next(method for method in service.method if method.name == name)


def _enum(fdp: FileDescriptorProto, name: str) -> EnumDescriptorProto:
    """Find an enum by its name inside the package (``AckPolicy`` or ``Ack.Error``)."""
    _, enums = _index(fdp)
    return enums[f".{fdp.package}.{name}"]


def _enum_value(
    fdp: FileDescriptorProto, enum: str, name: str
) -> descriptor_pb2.EnumValueDescriptorProto:
    """Find a value of an enum (see :func:`_enum`) by name."""
    return next(value for value in _enum(fdp, enum).value if value.name == name)


def _replace_methods(fdp: FileDescriptorProto, methods: list[MethodDescriptorProto]) -> None:
    """Replace the methods of service ``API`` with ``methods`` (copies, in that order)."""
    service = next(service for service in fdp.service if service.name == SERVICE)
    copies = [MethodDescriptorProto() for _ in methods]
    for copied, method in zip(copies, methods, strict=True):
        copied.CopyFrom(method)
    del service.method[:]
    service.method.extend(copies)


def _renumber_message_offset(fdp: FileDescriptorProto) -> None:
    _field(fdp, "Message", "offset").number = 13


def _narrow_message_timestamp(fdp: FileDescriptorProto) -> None:
    _field(fdp, "Message", "timestamp").type = FieldDescriptorProto.TYPE_INT32


def _repeat_message_offset(fdp: FileDescriptorProto) -> None:
    _field(fdp, "Message", "offset").label = FieldDescriptorProto.LABEL_REPEATED


def _rename_ack_correlation_id(fdp: FileDescriptorProto) -> None:
    _field(fdp, "Ack", "correlationId").name = "correlation_id"


def _retarget_publish_response_ack(fdp: FileDescriptorProto) -> None:
    _field(fdp, "PublishResponse", "ack").type_name = _qualified("PublishAsyncError")


def _widen_partitions_map_key(fdp: FileDescriptorProto) -> None:
    entry_name = _field(fdp, "StreamMetadata", "partitions").type_name.rsplit(".", 1)[1]
    nested_types = _message(fdp, "StreamMetadata").nested_type
    entry = next(nested for nested in nested_types if nested.name == entry_name)
    key = next(field for field in entry.field if field.number == 1)
    key.type = FieldDescriptorProto.TYPE_INT64


def _drop_fetch_metadata_groups(fdp: FileDescriptorProto) -> None:
    message = _message(fdp, "FetchMetadataRequest")
    names = [field.name for field in message.field]
    del message.field[names.index("groups")]


def _drop_partition_event_timestamps(fdp: FileDescriptorProto) -> None:
    names = [message.name for message in fdp.message_type]
    del fdp.message_type[names.index("PartitionEventTimestamps")]


def _make_correlation_id_proto3_optional(fdp: FileDescriptorProto) -> None:
    message = _message(fdp, "Message")
    message.oneof_decl.add(name="_correlationId")
    field = _field(fdp, "Message", "correlationId")
    field.proto3_optional = True
    field.oneof_index = len(message.oneof_decl) - 1


def _add_message_field_50(fdp: FileDescriptorProto) -> None:
    _message(fdp, "Message").field.add(
        name="fluxExtra",
        number=50,
        type=FieldDescriptorProto.TYPE_STRING,
        label=FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="fluxExtra",
    )


def _drop_publish_to_subject(fdp: FileDescriptorProto) -> None:
    service = next(service for service in fdp.service if service.name == SERVICE)
    _replace_methods(fdp, [m for m in service.method if m.name != "PublishToSubject"])


def _flip_subscribe_server_streaming(fdp: FileDescriptorProto) -> None:
    method = _method(fdp, "Subscribe")
    method.server_streaming = not method.server_streaming


def _flip_publish_async_client_streaming(fdp: FileDescriptorProto) -> None:
    method = _method(fdp, "PublishAsync")
    method.client_streaming = not method.client_streaming


def _retarget_fetch_cursor_input(fdp: FileDescriptorProto) -> None:
    _method(fdp, "FetchCursor").input_type = _qualified("SetCursorRequest")


def _retarget_fetch_metadata_output(fdp: FileDescriptorProto) -> None:
    _method(fdp, "FetchMetadata").output_type = _qualified("FetchPartitionMetadataResponse")


def _swap_publish_and_publish_async(fdp: FileDescriptorProto) -> None:
    service = next(service for service in fdp.service if service.name == SERVICE)
    methods = list(service.method)
    first = next(i for i, m in enumerate(methods) if m.name == "Publish")
    second = next(i for i, m in enumerate(methods) if m.name == "PublishAsync")
    methods[first], methods[second] = methods[second], methods[first]
    _replace_methods(fdp, methods)


def _renumber_ack_policy_none(fdp: FileDescriptorProto) -> None:
    _enum_value(fdp, "AckPolicy", "NONE").number = 3


def _add_start_position_value(fdp: FileDescriptorProto) -> None:
    _enum(fdp, "StartPosition").value.add(name="FLUX_COMMITTED", number=5)


def _rename_stop_latest(fdp: FileDescriptorProto) -> None:
    _enum_value(fdp, "StopPosition", "STOP_LATEST").name = "STOP_NEWEST"


def _renumber_ack_error_too_large(fdp: FileDescriptorProto) -> None:
    _enum_value(fdp, "Ack.Error", "TOO_LARGE").number = 9


def _add_publish_async_error_code(fdp: FileDescriptorProto) -> None:
    _enum(fdp, "PublishAsyncError.Code").value.add(name="THROTTLED", number=8)


def _unreserve_subscribe_12(fdp: FileDescriptorProto) -> None:
    del _message(fdp, "SubscribeRequest").reserved_range[:]


def _add_subscribe_field_12(fdp: FileDescriptorProto) -> None:
    _message(fdp, "SubscribeRequest").field.add(
        name="reverse",
        number=SUBSCRIBE_RESERVED_FIELD,
        type=FieldDescriptorProto.TYPE_BOOL,
        label=FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="reverse",
    )


def _rename_package(fdp: FileDescriptorProto) -> None:
    fdp.package = "flux"


Mutation = Callable[[FileDescriptorProto], None]

BREAKING_MUTATIONS: Final[list[object]] = [
    pytest.param(_renumber_message_offset, "message proto.Message", id="field/number"),
    pytest.param(_narrow_message_timestamp, "message proto.Message", id="field/int64-to-int32"),
    pytest.param(_repeat_message_offset, "message proto.Message", id="field/label-repeated"),
    pytest.param(_rename_ack_correlation_id, "message proto.Ack", id="field/renamed"),
    pytest.param(
        _retarget_publish_response_ack, "message proto.PublishResponse", id="field/type-name"
    ),
    pytest.param(_widen_partitions_map_key, "message proto.StreamMetadata", id="field/map-key"),
    pytest.param(
        _drop_fetch_metadata_groups, "message proto.FetchMetadataRequest", id="field/removed"
    ),
    pytest.param(
        _make_correlation_id_proto3_optional,
        "message proto.Message",
        id="field/proto3-optional",
    ),
    pytest.param(_add_message_field_50, "message proto.Message", id="field/extra-below-1000"),
    pytest.param(
        _drop_partition_event_timestamps,
        "message proto.PartitionEventTimestamps",
        id="message/removed",
    ),
    pytest.param(_drop_publish_to_subject, "rpc proto.API/PublishToSubject", id="rpc/removed"),
    pytest.param(
        _flip_subscribe_server_streaming,
        "rpc proto.API/Subscribe",
        id="rpc/subscribe-server-streaming",
    ),
    pytest.param(
        _flip_publish_async_client_streaming,
        "rpc proto.API/PublishAsync",
        id="rpc/publish-async-client-streaming",
    ),
    pytest.param(_retarget_fetch_cursor_input, "rpc proto.API/FetchCursor", id="rpc/input-type"),
    pytest.param(
        _retarget_fetch_metadata_output, "rpc proto.API/FetchMetadata", id="rpc/output-type"
    ),
    pytest.param(_swap_publish_and_publish_async, "service proto.API", id="rpc/order"),
    pytest.param(_renumber_ack_policy_none, "enum proto.AckPolicy", id="enum/value-number"),
    pytest.param(_add_start_position_value, "enum proto.StartPosition", id="enum/extra-value"),
    pytest.param(_rename_stop_latest, "enum proto.StopPosition", id="enum/value-renamed"),
    pytest.param(
        _renumber_ack_error_too_large, "enum proto.Ack.Error", id="enum/nested-value-number"
    ),
    pytest.param(
        _add_publish_async_error_code,
        "enum proto.PublishAsyncError.Code",
        id="enum/nested-extra-value",
    ),
    pytest.param(
        _unreserve_subscribe_12, "message proto.SubscribeRequest", id="subscribe/unreserved-12"
    ),
    pytest.param(
        _add_subscribe_field_12, "message proto.SubscribeRequest", id="subscribe/field-12"
    ),
    pytest.param(_rename_package, "package", id="file/package"),
]


@pytest.mark.parametrize(("mutate", "mentions"), BREAKING_MUTATIONS)
def test_breaking_change_is_reported(
    flux_descriptor: FileDescriptorProto, mutate: Mutation, mentions: str
) -> None:
    """Each single incompatible change yields a new difference naming what it broke."""
    baseline = set(wire_differences(flux_descriptor))
    mutated = _copy(flux_descriptor)
    mutate(mutated)
    new_differences = [d for d in wire_differences(mutated) if d not in baseline]
    assert new_differences, "the checker missed an incompatible change"
    assert any(mentions in difference for difference in new_differences), new_differences


# --- Extensions that must stay allowed ----------------------------------------------------


def _add_message_field_1000(fdp: FileDescriptorProto) -> None:
    _message(fdp, "Message").field.add(
        name="fluxLeaderEpoch",
        number=EXTENSION_FIELD_MIN,
        type=FieldDescriptorProto.TYPE_UINT64,
        label=FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="fluxLeaderEpoch",
    )


def _flux_extension_rpc() -> MethodDescriptorProto:
    return MethodDescriptorProto(
        name="FluxExtension",
        input_type=_qualified("FetchMetadataRequest"),
        output_type=_qualified("FetchMetadataResponse"),
    )


def _append_flux_extension_rpc(fdp: FileDescriptorProto) -> None:
    service = next(service for service in fdp.service if service.name == SERVICE)
    _replace_methods(fdp, [*service.method, _flux_extension_rpc()])


def _insert_flux_extension_rpc(fdp: FileDescriptorProto) -> None:
    service = next(service for service in fdp.service if service.name == SERVICE)
    methods = list(service.method)
    methods.insert(len(methods) // 2, _flux_extension_rpc())
    _replace_methods(fdp, methods)


def _add_field_1000_and_flux_extension_rpc(fdp: FileDescriptorProto) -> None:
    _add_message_field_1000(fdp)
    _append_flux_extension_rpc(fdp)


ALLOWED_EXTENSIONS: Final[list[object]] = [
    pytest.param(_add_message_field_1000, id="field/message-1000"),
    pytest.param(_append_flux_extension_rpc, id="rpc/appended"),
    pytest.param(_insert_flux_extension_rpc, id="rpc/between-liftbridge-rpcs"),
    pytest.param(_add_field_1000_and_flux_extension_rpc, id="field-and-rpc"),
]


@pytest.mark.parametrize("extend", ALLOWED_EXTENSIONS)
def test_flux_extension_is_allowed(flux_descriptor: FileDescriptorProto, extend: Mutation) -> None:
    """Fields numbered >= 1000 and extra RPCs add no difference."""
    mutated = _copy(flux_descriptor)
    extend(mutated)
    assert wire_differences(mutated) == wire_differences(flux_descriptor)
