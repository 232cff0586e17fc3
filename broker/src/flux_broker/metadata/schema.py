"""The metadata database's schema: DDL as an ordered list of migrations, and the migrator.

The schema only ever moves forward. Each :class:`Migration` has the next version number and
runs, with the row recording it in ``schema_version``, in one transaction, so a crash leaves the
database at one version or the next, never in between. Opening a database runs the migrations
it lacks; opening one from a newer Flux fails without touching it. A later feature adds a
migration at the end of :data:`MIGRATIONS` (for example ``ALTER TABLE partitions ADD COLUMN
paused ...``); a released migration never changes.

Version 1 (streams and partitions)::

    metadata_state      one row: applied_index (the metadata index of the last command)
    streams             name PK, subject, group_name, replication_factor, creation_timestamp_ns,
                        one nullable column per StreamConfig field (NULL = server default)
    partitions          (stream_name, partition_id) PK → streams ON DELETE CASCADE;
                        leader → partition_replicas (deferred), leader_epoch, epoch
    partition_replicas  (stream_name, partition_id, broker_id) PK → partitions ON DELETE
                        CASCADE; position (replica order, unique), in_isr (0/1)

Version 2 (pause and read-only)::

    streams             + resume_all (0/1): what the latest PauseStream asked
    partitions          + paused, readonly (0/1), and the Unix-ns times of the first and the
                        latest pause-state and read-only change: pause_first_ns,
                        pause_latest_ns, readonly_first_ns, readonly_latest_ns (0 = never)

Version 3 (activity outbox)::

    activity_outbox     id PK (the metadata index of the command it reports), op, detail
                        (JSON object); see :mod:`flux_broker.metadata.activity`

Version 4 (consumer groups): ``consumer_groups``, ``consumer_group_members`` and
``consumer_group_owners``; see :mod:`flux_broker.metadata.groups`.

Replicas are rows rather than a list in a column so the database itself guarantees what the
rest of the broker relies on: replica ids are unique, the ISR is a subset of the replicas (it
is a flag on them) and the leader is one of them (a foreign key checked at commit).

The stream config is one typed column per field, not a JSON document: SQLite then checks each
value's range, ``NULL`` says "not set" the same way Liftbridge's ``Nullable*`` wrappers do, and
a new config field is an explicit, versioned ``ADD COLUMN`` migration instead of a silent shape
change inside a blob that old and new code would read differently.

No table stores wall-clock times of its own (migrations included): two brokers that apply the
same commands hold the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import aiosqlite

from flux_broker.metadata.errors import UnsupportedSchemaError
from flux_broker.metadata.groups import GROUP_TABLES

__all__ = ["LATEST_SCHEMA_VERSION", "MIGRATIONS", "Migration", "migrate", "schema_version"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema.

    Attributes:
        version: The schema version it produces; versions run 1, 2, 3, … without gaps.
        name: What it adds, for people reading ``schema_version``.
        statements: The DDL/DML it runs, one statement each, in order.
    """

    version: int
    name: str
    statements: tuple[str, ...]


_INT64: Final = "BETWEEN 0 AND 9223372036854775807"
_INT32: Final = "BETWEEN 0 AND 2147483647"

_V1_STREAMS: Final = f"""
CREATE TABLE streams (
    name                              TEXT PRIMARY KEY CHECK (length(name) > 0),
    subject                           TEXT NOT NULL CHECK (length(subject) > 0),
    group_name                        TEXT NOT NULL,
    replication_factor                INTEGER NOT NULL CHECK (replication_factor >= 1),
    creation_timestamp_ns             INTEGER NOT NULL CHECK (creation_timestamp_ns >= 0),
    retention_max_bytes               INTEGER CHECK (retention_max_bytes {_INT64}),
    retention_max_messages            INTEGER CHECK (retention_max_messages {_INT64}),
    retention_max_age_ms              INTEGER CHECK (retention_max_age_ms {_INT64}),
    cleaner_interval_ms               INTEGER CHECK (cleaner_interval_ms {_INT64}),
    segment_max_bytes                 INTEGER CHECK (segment_max_bytes {_INT64}),
    segment_max_age_ms                INTEGER CHECK (segment_max_age_ms {_INT64}),
    compact_max_goroutines            INTEGER CHECK (compact_max_goroutines {_INT32}),
    compact_enabled                   INTEGER CHECK (compact_enabled IN (0, 1)),
    auto_pause_time_ms                INTEGER CHECK (auto_pause_time_ms {_INT64}),
    auto_pause_disable_if_subscribers INTEGER
        CHECK (auto_pause_disable_if_subscribers IN (0, 1)),
    min_isr                           INTEGER CHECK (min_isr {_INT32}),
    optimistic_concurrency_control    INTEGER CHECK (optimistic_concurrency_control IN (0, 1)),
    encryption                        INTEGER CHECK (encryption IN (0, 1))
) WITHOUT ROWID
"""

_V1_PARTITIONS: Final = """
CREATE TABLE partitions (
    stream_name   TEXT NOT NULL REFERENCES streams (name) ON DELETE CASCADE,
    partition_id  INTEGER NOT NULL CHECK (partition_id >= 0),
    leader        TEXT NOT NULL,
    leader_epoch  INTEGER NOT NULL CHECK (leader_epoch >= 0),
    epoch         INTEGER NOT NULL CHECK (epoch >= leader_epoch),
    PRIMARY KEY (stream_name, partition_id),
    FOREIGN KEY (stream_name, partition_id, leader)
        REFERENCES partition_replicas (stream_name, partition_id, broker_id)
        DEFERRABLE INITIALLY DEFERRED
) WITHOUT ROWID
"""

_V1_REPLICAS: Final = """
CREATE TABLE partition_replicas (
    stream_name   TEXT NOT NULL,
    partition_id  INTEGER NOT NULL,
    broker_id     TEXT NOT NULL CHECK (length(broker_id) > 0),
    position      INTEGER NOT NULL CHECK (position >= 0),
    in_isr        INTEGER NOT NULL CHECK (in_isr IN (0, 1)),
    PRIMARY KEY (stream_name, partition_id, broker_id),
    UNIQUE (stream_name, partition_id, position),
    FOREIGN KEY (stream_name, partition_id)
        REFERENCES partitions (stream_name, partition_id) ON DELETE CASCADE
) WITHOUT ROWID
"""


def _flag_column(table: str, column: str) -> str:
    return (
        f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0 "
        f"CHECK ({column} IN (0, 1))"
    )


def _timestamp_column(column: str) -> str:
    return (
        f"ALTER TABLE partitions ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0 "
        f"CHECK ({column} {_INT64})"
    )


#: Every schema step, oldest first.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        version=1,
        name="streams and partitions",
        statements=(
            """
            CREATE TABLE metadata_state (
                id            INTEGER PRIMARY KEY CHECK (id = 1),
                applied_index INTEGER NOT NULL CHECK (applied_index >= 0)
            )
            """,
            "INSERT INTO metadata_state (id, applied_index) VALUES (1, 0)",
            _V1_STREAMS,
            _V1_PARTITIONS,
            _V1_REPLICAS,
        ),
    ),
    Migration(
        version=2,
        name="pause and read-only",
        statements=(
            _flag_column("streams", "resume_all"),
            _flag_column("partitions", "paused"),
            _flag_column("partitions", "readonly"),
            _timestamp_column("pause_first_ns"),
            _timestamp_column("pause_latest_ns"),
            _timestamp_column("readonly_first_ns"),
            _timestamp_column("readonly_latest_ns"),
        ),
    ),
    Migration(
        version=3,
        name="activity outbox",
        statements=(
            """
            CREATE TABLE activity_outbox (
                id     INTEGER PRIMARY KEY CHECK (id >= 1),
                op     TEXT NOT NULL CHECK (length(op) > 0),
                detail TEXT NOT NULL CHECK (json_valid(detail))
            )
            """,
        ),
    ),
    Migration(version=4, name="consumer groups", statements=GROUP_TABLES),
)

#: The schema version this Flux writes.
LATEST_SCHEMA_VERSION: Final = MIGRATIONS[-1].version

_CREATE_SCHEMA_VERSION: Final = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY CHECK (version >= 1),
    name    TEXT NOT NULL
)
"""


async def schema_version(db: aiosqlite.Connection) -> int:
    """Return the database's schema version: 0 for a new database.

    Args:
        db: An open connection.

    Returns:
        The highest applied migration's version.
    """
    exists = await db.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    )
    if not list(exists):
        return 0
    rows = list(await db.execute_fetchall("SELECT coalesce(max(version), 0) FROM schema_version"))
    return int(rows[0][0])


async def migrate(db: aiosqlite.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring the database up to the last of ``migrations``, one transaction per step.

    Idempotent: an up-to-date database is left as it is.

    Args:
        db: An open connection in autocommit mode (``isolation_level=None``).
        migrations: The steps, versions 1, 2, … in order (tests pass longer lists).

    Returns:
        The schema version the database is at now.

    Raises:
        UnsupportedSchemaError: The database is newer than the last migration; unchanged.
        sqlite3.Error: A step failed; the database stays at the version before it.
    """
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    latest = len(migrations)
    # One pass per pending step, plus the pass that finds nothing left to do.
    for _ in range(latest + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(_CREATE_SCHEMA_VERSION)
            current = await schema_version(db)
            if current > latest:
                raise UnsupportedSchemaError(current, latest)
            if current == latest:
                await db.execute("COMMIT")
                return current
            step = migrations[current]
            for statement in step.statements:
                await db.execute(statement)
            await db.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)",
                (step.version, step.name),
            )
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
    raise AssertionError("unreachable: every pass applies a step or returns")
