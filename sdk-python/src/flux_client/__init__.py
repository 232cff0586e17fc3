"""flux_client: the Python SDK for Flux (asyncio).

Connect, create a stream, produce and consume::

    import flux_client
    from flux_client import Start

    async with await flux_client.connect("localhost:9292") as client:
        await client.create_stream("orders", partitions=3)
        async with client.producer() as producer:
            meta = await producer.send("orders", b"hello", key=b"customer-1")
        async for msg in client.subscribe_stream("orders", start=Start.EARLIEST):
            print(msg.partition, msg.offset, msg.value)

``__all__`` is the public surface and is checked by a test: a name is public if and only if it
is listed here. Every error is a :class:`FluxError` (the tree is drawn in the docs, "Python
SDK" page); its ``code`` is one of ``flux_proto.errors.ERROR_CODES``, shared with the
TypeScript SDK.
"""

from importlib.metadata import version as _version

from flux_client._client import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_KEEPALIVE_MS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    Client,
    connect,
)
from flux_client._errors import (
    AckFailedError,
    AckTimeoutError,
    BufferFullError,
    CallTimeoutError,
    ClosedError,
    ConnectionFailedError,
    CorruptRecordError,
    CursorsDisabledError,
    DiskFullError,
    DuplicateSequenceError,
    EncryptionFailedError,
    EncryptionUnavailableError,
    FluxError,
    GroupAssignorMismatchError,
    GroupEpochMismatchError,
    GroupFencedError,
    GroupNotEmptyError,
    GroupNotFoundError,
    IncorrectOffsetError,
    InternalError,
    InvalidArgumentError,
    MessageTooLargeError,
    NoMetadataLeaderError,
    NotCoordinatorError,
    NotGroupMemberError,
    NotLeaderError,
    NotPartitionOwnerError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    PartitionNotFoundError,
    PartitionPausedError,
    ReadonlyEndError,
    ReadonlyError,
    ResourceLimitError,
    SlowConsumerError,
    StopReachedError,
    StorageFailedError,
    StreamEmptyError,
    StreamExistsError,
    StreamNotFoundError,
    StreamReservedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    error_class,
)
from flux_client._partitioner import KeyHashPartitioner, Partitioner, RoundRobinPartitioner
from flux_client._producer import (
    DEFAULT_DELIVERY_TIMEOUT_MS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BLOCK_MS,
    DEFAULT_MAX_BUFFER_BYTES,
    Producer,
    ProducerStats,
)
from flux_client._retry import RetryPolicy
from flux_client._subscription import (
    DEFAULT_SUBSCRIBE_BATCH_BYTES,
    DEFAULT_SUBSCRIBE_BUFFER_BYTES,
    PartitionStats,
    Subscription,
    SubscriptionStats,
)
from flux_client._types import (
    AckPolicy,
    BrokerMetadata,
    Message,
    Metadata,
    PartitionMetadata,
    Record,
    RecordMetadata,
    Start,
    Stop,
    StreamMetadata,
)

__version__: str = _version("flux-client")

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_MS",
    "DEFAULT_DELIVERY_TIMEOUT_MS",
    "DEFAULT_KEEPALIVE_MS",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BLOCK_MS",
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_MS",
    "DEFAULT_SUBSCRIBE_BATCH_BYTES",
    "DEFAULT_SUBSCRIBE_BUFFER_BYTES",
    "AckFailedError",
    "AckPolicy",
    "AckTimeoutError",
    "BrokerMetadata",
    "BufferFullError",
    "CallTimeoutError",
    "Client",
    "ClosedError",
    "ConnectionFailedError",
    "CorruptRecordError",
    "CursorsDisabledError",
    "DiskFullError",
    "DuplicateSequenceError",
    "EncryptionFailedError",
    "EncryptionUnavailableError",
    "FluxError",
    "GroupAssignorMismatchError",
    "GroupEpochMismatchError",
    "GroupFencedError",
    "GroupNotEmptyError",
    "GroupNotFoundError",
    "IncorrectOffsetError",
    "InternalError",
    "InvalidArgumentError",
    "KeyHashPartitioner",
    "Message",
    "MessageTooLargeError",
    "Metadata",
    "NoMetadataLeaderError",
    "NotCoordinatorError",
    "NotGroupMemberError",
    "NotLeaderError",
    "NotPartitionOwnerError",
    "OffsetOutOfRangeError",
    "OutOfOrderSequenceError",
    "PartitionMetadata",
    "PartitionNotFoundError",
    "PartitionPausedError",
    "PartitionStats",
    "Partitioner",
    "Producer",
    "ProducerStats",
    "ReadonlyEndError",
    "ReadonlyError",
    "Record",
    "RecordMetadata",
    "ResourceLimitError",
    "RetryPolicy",
    "RoundRobinPartitioner",
    "SlowConsumerError",
    "Start",
    "Stop",
    "StopReachedError",
    "StorageFailedError",
    "StreamEmptyError",
    "StreamExistsError",
    "StreamMetadata",
    "StreamNotFoundError",
    "StreamReservedError",
    "Subscription",
    "SubscriptionStats",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "__version__",
    "connect",
    "error_class",
]
