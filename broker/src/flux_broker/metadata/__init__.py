"""Cluster metadata: streams and partitions in SQLite, changed only by commands.

Start with :mod:`flux_broker.metadata.contract` (the terms and the :class:`MetadataStore`
Protocol) and :mod:`flux_broker.metadata.commands`; :class:`SqliteMetadataStore` implements the
store, :mod:`flux_broker.metadata.schema` holds its tables and migrations.
"""

from flux_broker.metadata.activity import ActivityEvent, ActivityOp
from flux_broker.metadata.commands import (
    ActivityPublished,
    Command,
    CreateStream,
    DeleteStream,
    PartitionAssignment,
    PauseStream,
    ResumeStream,
    SetStreamReadonly,
)
from flux_broker.metadata.config import StreamConfig
from flux_broker.metadata.contract import AppliedCommand, MetadataStore, Partition, Stream
from flux_broker.metadata.errors import (
    InvalidCommandError,
    MetadataClosedError,
    MetadataError,
    MetadataStorageError,
    PartitionNotFoundError,
    StaleIndexError,
    StreamExistsError,
    StreamNotFoundError,
    UnsupportedSchemaError,
)
from flux_broker.metadata.store import SqliteMetadataStore

__all__ = [
    "ActivityEvent",
    "ActivityOp",
    "ActivityPublished",
    "AppliedCommand",
    "Command",
    "CreateStream",
    "DeleteStream",
    "InvalidCommandError",
    "MetadataClosedError",
    "MetadataError",
    "MetadataStorageError",
    "MetadataStore",
    "Partition",
    "PartitionAssignment",
    "PartitionNotFoundError",
    "PauseStream",
    "ResumeStream",
    "SetStreamReadonly",
    "SqliteMetadataStore",
    "StaleIndexError",
    "Stream",
    "StreamConfig",
    "StreamExistsError",
    "StreamNotFoundError",
    "UnsupportedSchemaError",
]
