"""Smoke test of the flux_client package: its public surface is exactly what __all__ says."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import subprocess
import sys

import pytest

import flux_client

#: The documented public API. Adding a name is a decision: update the docs and this set.
PUBLIC_API = {
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
    "DEFAULT_CONNECT_TIMEOUT_MS",
    "DEFAULT_DELIVERY_TIMEOUT_MS",
    "DEFAULT_KEEPALIVE_MS",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BLOCK_MS",
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_MS",
    "DEFAULT_SUBSCRIBE_BATCH_BYTES",
    "DEFAULT_SUBSCRIBE_BUFFER_BYTES",
    "DiskFullError",
    "DuplicateSequenceError",
    "EncryptionFailedError",
    "EncryptionUnavailableError",
    "FluxError",
    "IncorrectOffsetError",
    "InternalError",
    "InvalidArgumentError",
    "KeyHashPartitioner",
    "Message",
    "MessageTooLargeError",
    "Metadata",
    "NoMetadataLeaderError",
    "NotLeaderError",
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
    "GroupAssignorMismatchError",
    "GroupEpochMismatchError",
    "GroupFencedError",
    "GroupNotEmptyError",
    "GroupNotFoundError",
    "NotCoordinatorError",
    "NotGroupMemberError",
    "NotPartitionOwnerError",
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
}


def test_all_is_the_documented_surface() -> None:
    assert set(flux_client.__all__) == PUBLIC_API
    assert len(flux_client.__all__) == len(set(flux_client.__all__))


def test_every_public_name_exists() -> None:
    for name in flux_client.__all__:
        assert hasattr(flux_client, name), name


def test_public_modules_have_no_undeclared_names() -> None:
    public = {
        name
        for name in vars(flux_client)
        if not name.startswith("_") and not isinstance(getattr(flux_client, name), type(sys))
    }
    assert public <= set(flux_client.__all__)


def test_version_matches_the_distribution() -> None:
    assert flux_client.__version__ == importlib.metadata.version("flux-client")


def test_package_is_typed() -> None:
    assert importlib.resources.files("flux_client").joinpath("py.typed").is_file()


@pytest.mark.integration
def test_flux_cli_runs_as_a_process() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flux_client.cli import main; raise SystemExit(main())",
            "--version",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flux {flux_client.__version__}"


def test_message_fields_keep_their_order() -> None:
    """The subscription builds messages positionally (tuple.__new__) on its hot path."""
    assert flux_client.Message._fields == (
        "stream",
        "partition",
        "offset",
        "key",
        "value",
        "headers",
        "timestamp",
        "subject",
        "reply_subject",
    )
