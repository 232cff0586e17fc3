"""Auto-pause settings and timer, and the live partition's bookkeeping, without a broker."""

from __future__ import annotations

import asyncio
from typing import Final

import pytest

from flux_broker.clock import ManualClock, SystemClock
from flux_broker.log.errors import LogClosedError
from flux_broker.metadata import Partition, StreamConfig
from flux_broker.streams.auto_pause import AutoPause, run_auto_pause
from flux_broker.streams.live import LivePartition, PartitionState

MS: Final = 1_000_000
#: Bound on waits that must end; the timer itself works in milliseconds.
TIMEOUT_S: Final = 10.0


def live(clock: ManualClock | SystemClock) -> LivePartition:
    meta = Partition(
        stream="s", id=0, leader="b", replicas=("b",), isr=("b",), leader_epoch=1, epoch=1
    )
    return LivePartition(stream="s", id=0, subject="s", metadata=meta, clock=clock)


@pytest.mark.parametrize(
    ("config", "default_s", "default_disable", "expected"),
    [
        (StreamConfig(), 0.0, False, None),
        (StreamConfig(auto_pause_time_ms=0), 5.0, True, None),
        (StreamConfig(), 0.3, True, AutoPause(300 * MS, disable_if_subscribers=True)),
        (StreamConfig(auto_pause_time_ms=250), 0.0, False, AutoPause(250 * MS, False)),
        (
            StreamConfig(auto_pause_time_ms=1, auto_pause_disable_if_subscribers=False),
            0.0,
            True,
            AutoPause(1 * MS, disable_if_subscribers=False),
        ),
    ],
)
def test_settings_resolve_overrides_over_defaults(
    config: StreamConfig, default_s: float, default_disable: bool, expected: AutoPause | None
) -> None:
    assert (
        AutoPause.of(config, default_s=default_s, default_disable_if_subscribers=default_disable)
        == expected
    )


def test_due_counts_from_the_latest_activity() -> None:
    clock = ManualClock()
    partition = live(clock)
    partition.activated_ns = clock.now_ns()
    policy = AutoPause(300 * MS, disable_if_subscribers=True)
    clock.advance(0.299)
    assert not policy.due(partition, clock)
    clock.advance(0.001)
    assert policy.due(partition, clock)
    partition.stats.latest_received_ns = clock.now_ns()  # a message arrives
    assert not policy.due(partition, clock)
    clock.advance(0.3)
    with partition.subscription():
        assert partition.subscribers == 1
        assert not policy.due(partition, clock)  # subscribed, and the flag is set
        assert AutoPause(300 * MS, disable_if_subscribers=False).due(partition, clock)
        clock.advance(10)
    assert partition.subscribers == 0
    assert partition.unsubscribed_ns == clock.now_ns()
    assert not policy.due(partition, clock)  # counts from the last subscriber leaving
    clock.advance(0.3)
    assert policy.due(partition, clock)


def test_a_partition_without_a_log_answers_offsets_but_no_log() -> None:
    partition = live(ManualClock())
    assert partition.paused
    assert (partition.high_watermark, partition.newest_offset) == (-1, -1)
    with pytest.raises(LogClosedError):
        _ = partition.log
    with pytest.raises(LogClosedError):
        _ = partition.leader
    partition.release(offsets=(4, 4))
    assert (partition.high_watermark, partition.newest_offset) == (4, 4)


async def test_notify_wakes_whoever_took_the_event_before() -> None:
    partition = live(ManualClock())
    taken = partition.changed()
    partition.notify()
    assert taken.is_set()
    assert not partition.changed().is_set()  # a fresh event for the next change


async def test_timer_asks_for_a_pause_once_idle() -> None:
    clock = SystemClock()
    partition = live(clock)
    partition.state = PartitionState.ACTIVE
    partition.activated_ns = clock.now_ns()
    policy = AutoPause(20 * MS, disable_if_subscribers=False)
    asked = asyncio.Event()
    asked_at: list[int] = []

    async def pause() -> None:
        asked_at.append(clock.now_ns())
        asked.set()
        await asyncio.Event().wait()  # the manager's pause cancels the timer

    timer = asyncio.create_task(run_auto_pause(partition, policy, clock, pause))
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await asked.wait()
        assert asked_at[0] - partition.activated_ns >= 20 * MS
    finally:
        timer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await timer


async def test_timer_waits_for_subscribers_to_leave_when_asked() -> None:
    clock = SystemClock()
    partition = live(clock)
    partition.activated_ns = clock.now_ns()
    policy = AutoPause(1 * MS, disable_if_subscribers=True)
    asked = asyncio.Event()

    async def pause() -> None:
        assert partition.subscribers == 0
        asked.set()
        await asyncio.Event().wait()

    with partition.subscription():
        timer = asyncio.create_task(run_auto_pause(partition, policy, clock, pause))
        # The timer parks on the subscriber count: nothing is due while it is held.
        for _ in range(10):
            await asyncio.sleep(0)
        assert not asked.is_set()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await asked.wait()
    finally:
        timer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await timer


async def test_a_failed_pause_is_retried_after_a_period() -> None:
    clock = SystemClock()
    partition = live(clock)
    partition.activated_ns = clock.now_ns()
    policy = AutoPause(5 * MS, disable_if_subscribers=False)
    calls = 0
    second = asyncio.Event()

    async def pause() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            second.set()
            await asyncio.Event().wait()
        raise RuntimeError("the store failed")

    timer = asyncio.create_task(run_auto_pause(partition, policy, clock, pause))
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await second.wait()
    finally:
        timer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await timer
