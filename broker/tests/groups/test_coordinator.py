"""The coordinator in-process over a real SQLite metadata store: what memory and disk agree on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from flux_broker.groups.coordinator import GroupCoordinator, GroupTimeouts
from flux_broker.groups.errors import GroupsFullError
from flux_broker.metadata import SqliteMetadataStore


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    async with await SqliteMetadataStore.open(tmp_path / "metadata.db") as opened:
        yield opened


def _coordinator(
    store: SqliteMetadataStore, *, max_groups: int = 10, max_empty_groups: int = 10
) -> GroupCoordinator:
    return GroupCoordinator(
        broker_id="b1",
        store=store,
        partition_counts=lambda: {"s": 4},
        notify_applied=lambda _applied: None,
        timeouts=GroupTimeouts(),
        max_groups=max_groups,
        max_empty_groups=max_empty_groups,
    )


async def test_a_join_cancelled_by_its_caller_still_lands_in_memory_and_on_disk(
    store: SqliteMetadataStore,
) -> None:
    coordinator = _coordinator(store)
    await coordinator.join("g", "a", ["s"])
    for consumer in ("b", "c", "d"):
        call = asyncio.ensure_future(coordinator.join("g", consumer, ["s"]))
        await asyncio.sleep(0)  # the change has started
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    # Every cancelled join finished behind its caller's back, identically in both places.
    await asyncio.wait_for(_agree(coordinator, store, {"a", "b", "c", "d"}), 10.0)
    # And the next change is computed from that state, at the next index.
    state = await coordinator.join("g", "e", ["s"])
    assert state.epoch == store.applied_index
    assert set(state.members) == {"a", "b", "c", "d", "e"}


async def _agree(
    coordinator: GroupCoordinator, store: SqliteMetadataStore, members: set[str]
) -> None:
    while True:
        (stored,) = await store.list_groups()
        if set(stored.members) == members and coordinator.group("g") == stored:
            return
        await asyncio.sleep(0.01)


async def test_groups_without_members_are_forgotten_oldest_first_beyond_the_limit(
    store: SqliteMetadataStore,
) -> None:
    coordinator = _coordinator(store, max_empty_groups=2, max_groups=1)
    for group in ("g1", "g2", "g3"):
        await coordinator.join(group, "a", ["s"])
        # Only groups with members count towards max_groups: the next one is refused.
        with pytest.raises(GroupsFullError):
            await coordinator.join("other", "a", ["s"])
        await coordinator.leave(group, "a")
    assert [g.group_id for g in coordinator.groups()] == ["g2", "g3"]
    assert [g.group_id for g in await store.list_groups()] == ["g2", "g3"]
    # A group forgotten can be joined again; its epoch still grows past every earlier one.
    again = await coordinator.join("g1", "a", ["s"])
    assert again.epoch == store.applied_index
