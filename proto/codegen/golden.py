"""Write golden message bytes: what Python's protobuf encodes, for every other SDK to decode.

Usage: ``python golden.py OUT_DIR``. For each sample it writes ``<name>.binpb`` (the
deterministic serialisation) and one ``index.json`` listing the samples with their message
type and canonical protobuf JSON. A TypeScript spec decodes each file, compares the JSON and
re-encodes the message byte for byte; a Python test does the same against the committed files.

The samples exercise what differs between protobuf implementations: negative int64 (ten-byte
varints), uint64 above 2**63, maps with integer and string keys, packed repeated int32, nested
enums, absent versus zero-valued wrapper messages, empty messages and non-UTF-8 bytes.

Byte-for-byte re-encoding is the rule, with one exception the protobuf spec itself makes: the
order of map entries on the wire is unspecified (Python's upb writes the int32 keys {0, 7} as
7, 0; protobuf-es writes 0, 7). Samples listed in :data:`ENTRY_ORDER_FREE` have maps with
several entries; for them the index says ``"byte_exact": false`` and readers check that the
re-encoded bytes have the same length and decode to the same message instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import Message

from flux_proto import api_pb2 as api

#: Samples with multi-entry maps: their content is fixed, their entry order is not.
ENTRY_ORDER_FREE = frozenset({"fetch_metadata_response"})


def samples() -> dict[str, Message]:
    """Return the golden messages by file name."""
    return {
        "message": api.Message(
            offset=-1,
            key=b"order-17",
            value=b"\x00\xb9\x0e\x43\xb4\xff payload",
            timestamp=1_700_000_000_123_456_789,
            stream="orders",
            partition=3,
            subject="orders.3",
            replySubject="_INBOX.abc",
            headers={"reply": b"", "subject": b"orders.3", "trace": b"\x01\x02"},
            ackInbox="flux.ack.xyz",
            correlationId="c-1",
            ackPolicy=api.ALL,
        ),
        "ack": api.Ack(
            stream="orders",
            partitionSubject="orders.3",
            msgSubject="orders.3",
            offset=9_223_372_036_854_775_807,
            ackInbox="flux.ack.xyz",
            correlationId="c-1",
            ackPolicy=api.LEADER,
            receptionTimestamp=1_700_000_000_000_000_000,
            commitTimestamp=1_700_000_000_000_000_001,
            ackError=api.Ack.INCORRECT_OFFSET,
        ),
        "create_stream_request": api.CreateStreamRequest(
            subject="orders.*",
            name="orders",
            group="workers",
            replicationFactor=-1,
            partitions=4,
            retentionMaxBytes=api.NullableInt64(value=0),
            retentionMaxAge=api.NullableInt64(value=86_400_000),
            compactMaxGoroutines=api.NullableInt32(value=-2),
            compactEnabled=api.NullableBool(value=False),
            optimisticConcurrencyControl=api.NullableBool(value=True),
        ),
        "subscribe_request": api.SubscribeRequest(
            stream="orders",
            partition=2,
            startPosition=api.TIMESTAMP,
            startOffset=-5,
            startTimestamp=1_700_000_000_000_000_000,
            resume=True,
            stopPosition=api.STOP_OFFSET,
            stopOffset=1000,
            consumer=api.Consumer(
                groupId="g", groupEpoch=18_446_744_073_709_551_615, consumerId="m-1"
            ),
        ),
        "fetch_metadata_response": api.FetchMetadataResponse(
            brokers=[
                api.Broker(id="b1", host="127.0.0.1", port=9292, partitionCount=2, leaderCount=2)
            ],
            streamMetadata=[
                api.StreamMetadata(
                    name="orders",
                    subject="orders",
                    creationTimestamp=1_700_000_000_000_000_000,
                    partitions={
                        0: api.PartitionMetadata(
                            id=0,
                            leader="b1",
                            replicas=["b1"],
                            isr=["b1"],
                            highWatermark=-1,
                            newestOffset=-1,
                        ),
                        7: api.PartitionMetadata(
                            id=7,
                            leader="b1",
                            replicas=["b1", "b2"],
                            isr=["b1"],
                            highWatermark=41,
                            newestOffset=42,
                            paused=True,
                            readonly=True,
                            messagesReceivedTimestamps=api.PartitionEventTimestamps(
                                firstTimestamp=1, latestTimestamp=2
                            ),
                            pauseTimestamps=api.PartitionEventTimestamps(),
                        ),
                    },
                ),
                api.StreamMetadata(name="missing", error=api.StreamMetadata.UNKNOWN_STREAM),
            ],
            groupMetadata=[
                api.ConsumerGroupMetadata(groupId="g", coordinator="b1", epoch=5),
            ],
        ),
        "publish_response_async_error": api.PublishResponse(
            ack=api.Ack(),
            asyncError=api.PublishAsyncError(
                code=api.PublishAsyncError.READONLY, message="partition is readonly"
            ),
            correlationId="c-9",
        ),
        "pause_stream_request": api.PauseStreamRequest(
            name="orders", partitions=[0, 1, 300, -1], resumeAll=True
        ),
        "activity_stream_event": api.ActivityStreamEvent(
            id=12,
            op=api.JOIN_CONSUMER_GROUP,
            joinConsumerGroupOp=api.JoinConsumerGroupOp(
                groupId="g", consumerId="m-1", streams=["orders", "payments"]
            ),
        ),
        "fetch_consumer_group_assignments_response": (
            api.FetchConsumerGroupAssignmentsResponse(
                epoch=3,
                assignments=[api.PartitionAssignment(stream="orders", partitions=[0, 2])],
            )
        ),
        "empty_create_stream_response": api.CreateStreamResponse(),
    }


def main() -> int:
    """Write every sample and the index into the directory given on the command line."""
    out_dir = Path(sys.argv[1])
    index = []
    for name, message in samples().items():
        file_name = f"{name}.binpb"
        (out_dir / file_name).write_bytes(message.SerializeToString(deterministic=True))
        index.append(
            {
                "name": name,
                "type": message.DESCRIPTOR.full_name,
                "file": file_name,
                "json": json_format.MessageToDict(message),
                "byte_exact": name not in ENTRY_ORDER_FREE,
            }
        )
    text = json.dumps({"samples": index}, indent=2, sort_keys=True, ensure_ascii=False)
    (out_dir / "index.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
