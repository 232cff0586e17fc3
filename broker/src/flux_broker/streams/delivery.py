"""Delivery: how a stored record becomes the ``Message`` that Subscribe sends.

Liftbridge stores the NATS subject and reply subject of every message it receives over NATS
as the headers ``subject`` and ``reply``, and on delivery fills ``Message.subject`` and
``Message.replySubject`` from them while leaving both in the headers map (reference
``liftbridge-api.md`` §1.4). Records written without a ``subject`` header -- Flux's batched
publish -- are served with the partition's subject (DESIGN.md §4.2).
"""

from __future__ import annotations

from flux_broker.log.format import Record
from flux_broker.streams.partition import REPLY_HEADER, SUBJECT_HEADER
from flux_proto import api_pb2

__all__ = ["record_to_message"]


def record_to_message(
    record: Record, stream: str, partition: int, partition_subject: str
) -> api_pb2.Message:
    """The Subscribe ``Message`` for a stored record.

    Args:
        record: The record, as read from the partition's log.
        stream: The stream's name.
        partition: The partition's id.
        partition_subject: The partition's NATS subject, served as ``subject`` when the
            record has no ``subject`` header.

    Returns:
        The message: offset, key and value (a null key or value is sent as empty bytes, the
        only form protobuf has), the broker timestamp, stream and partition, subject and
        reply subject from the ``subject``/``reply`` headers, and every stored header. A
        header name stored twice keeps its last value (the proto field is a map). Header
        values that are not UTF-8 are decoded with replacement characters for the subject
        fields (proto strings must be UTF-8) and kept as they are in the map.
    """
    headers = dict(record.headers)
    subject = headers.get(SUBJECT_HEADER)
    reply = headers.get(REPLY_HEADER)
    return api_pb2.Message(
        offset=record.offset,
        key=record.key if record.key is not None else b"",
        value=record.value if record.value is not None else b"",
        timestamp=record.timestamp_ns,
        stream=stream,
        partition=partition,
        subject=partition_subject if subject is None else subject.decode(errors="replace"),
        replySubject="" if reply is None else reply.decode(errors="replace"),
        headers=headers,
    )
