"""Consumer groups against a real broker process: Liftbridge's RPCs, Flux's push, assignors,
revoke-before-assign, member-checked commits, fencing, describe/list/reset, restart, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import pytest

from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess, BrokerProcessError
from flux_testing.pytest_plugin import BrokerFactory

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub

DEADLINE_S = 10.0
GROUP = "workers"
#: Short liveness settings, so timeouts are tested in about a second.
FAST = {
    "FLUX_GROUPS_CONSUMER_TIMEOUT": "1s",
    "FLUX_GROUPS_REVOKE_TIMEOUT": "1s",
}

Assigned: TypeAlias = dict[str, tuple[int, ...]]


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _create(api: API, name: str, partitions: int) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=f"{name}.in", partitions=partitions),
        timeout=DEADLINE_S,
    )


async def _join(
    api: API, consumer: str, streams: list[str], *, group: str = GROUP, assignor: str = ""
) -> api_pb2.JoinConsumerGroupResponse:
    return await api.JoinConsumerGroup(
        api_pb2.JoinConsumerGroupRequest(
            groupId=group, consumerId=consumer, streams=streams, assignor=assignor
        ),
        timeout=DEADLINE_S,
    )


async def _epoch(api: API, group: str = GROUP) -> int:
    response = await api.FetchMetadata(
        api_pb2.FetchMetadataRequest(groups=[group]), timeout=DEADLINE_S
    )
    return int(response.groupMetadata[0].epoch)


async def _fetch(api: API, consumer: str, group: str = GROUP) -> tuple[int, Assigned]:
    """Poll as the Go client does: on an epoch mismatch, read the epoch and poll again."""
    for _ in range(5):
        epoch = await _epoch(api, group)
        try:
            response = await api.FetchConsumerGroupAssignments(
                api_pb2.FetchConsumerGroupAssignmentsRequest(
                    groupId=group, consumerId=consumer, epoch=epoch
                ),
                timeout=DEADLINE_S,
            )
        except grpc.aio.AioRpcError as error:
            if _reason(error) != "group-epoch-mismatch":
                raise
            continue
        return response.epoch, {a.stream: tuple(a.partitions) for a in response.assignments}
    raise AssertionError("the epoch kept changing")


async def _describe(api: API, group: str = GROUP) -> api_pb2.DescribeConsumerGroupResponse:
    return await api.DescribeConsumerGroup(
        api_pb2.DescribeConsumerGroupRequest(groupId=group), timeout=DEADLINE_S
    )


def _owned(description: api_pb2.DescribeConsumerGroupResponse) -> dict[tuple[str, int], str]:
    return {(p.stream, p.partition): p.owner for p in description.partitions if p.owner}


def _flat(assigned: Assigned) -> set[tuple[str, int]]:
    return {(s, p) for s, ps in assigned.items() for p in ps}


async def test_liftbridge_flow_join_fetch_rebalance_leave(api: API, broker: BrokerProcess) -> None:
    await _create(api, "orders", 4)
    joined = await _join(api, "a", ["orders"])
    assert joined.coordinator == broker.broker_id
    assert joined.epoch > 0
    assert joined.consumerTimeout == 15 * 10**9
    assert joined.coordinatorTimeout == 15 * 10**9
    assert joined.assignor == "least-loaded"
    assert await _epoch(api) == joined.epoch
    epoch_a, assigned_a = await _fetch(api, "a")
    assert epoch_a == joined.epoch
    assert assigned_a == {"orders": (0, 1, 2, 3)}

    # A second member: the epoch grows and a stale epoch is refused.
    joined_b = await _join(api, "b", ["orders"])
    assert joined_b.epoch > joined.epoch
    stale = await _refused(
        api.FetchConsumerGroupAssignments(
            api_pb2.FetchConsumerGroupAssignmentsRequest(
                groupId=GROUP, consumerId="a", epoch=joined.epoch
            ),
            timeout=DEADLINE_S,
        )
    )
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(stale) == "group-epoch-mismatch"
    # Revoke-before-assign: b gets nothing until a confirms by fetching the new epoch.
    _, assigned_b = await _fetch(api, "b")
    assert assigned_b == {}
    _, assigned_a = await _fetch(api, "a")
    assert assigned_a == {"orders": (0, 2)}
    _, assigned_b = await _fetch(api, "b")
    assert assigned_b == {"orders": (1, 3)}

    await api.LeaveConsumerGroup(
        api_pb2.LeaveConsumerGroupRequest(groupId=GROUP, consumerId="b"), timeout=DEADLINE_S
    )
    _, assigned_a = await _fetch(api, "a")
    assert assigned_a == {"orders": (0, 1, 2, 3)}
    await api.LeaveConsumerGroup(
        api_pb2.LeaveConsumerGroupRequest(groupId=GROUP, consumerId="a"), timeout=DEADLINE_S
    )
    # The last member left: gone from metadata (as in Liftbridge), still described.
    metadata = await api.FetchMetadata(
        api_pb2.FetchMetadataRequest(groups=[GROUP]), timeout=DEADLINE_S
    )
    assert metadata.groupMetadata[0].error == api_pb2.ConsumerGroupMetadata.Error.UNKNOWN_GROUP
    gone = await _refused(
        api.FetchConsumerGroupAssignments(
            api_pb2.FetchConsumerGroupAssignmentsRequest(groupId=GROUP, consumerId="a"),
            timeout=DEADLINE_S,
        )
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    described = await _describe(api)
    assert list(described.members) == []
    assert [p.partition for p in described.partitions] == [0, 1, 2, 3]
    listed = await api.ListConsumerGroups(api_pb2.ListConsumerGroupsRequest(), timeout=DEADLINE_S)
    assert [(g.groupId, g.members) for g in listed.groups] == [(GROUP, 0)]


@pytest.mark.parametrize(
    ("assignor", "expected"),
    [
        ("least-loaded", {"a": {"s": (0, 2, 4)}, "b": {"s": (1, 3)}}),
        ("range", {"a": {"s": (0, 1, 2)}, "b": {"s": (3, 4)}}),
        ("round-robin", {"a": {"s": (0, 2, 4)}, "b": {"s": (1, 3)}}),
    ],
)
async def test_the_assignor_is_chosen_when_the_group_is_created(
    api: API, assignor: str, expected: dict[str, Assigned]
) -> None:
    await _create(api, "s", 5)
    await _join(api, "a", ["s"], assignor=assignor)
    await _join(api, "b", ["s"])  # no assignor: the group's
    await _fetch(api, "a")  # confirms the revocations
    assert {c: (await _fetch(api, c))[1] for c in ("a", "b")} == expected
    mismatch = await _refused(
        _join(api, "c", ["s"], assignor="range" if assignor != "range" else "round-robin")
    )
    assert mismatch.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(mismatch) == "group-assignor-mismatch"
    assert (await _describe(api)).assignor == assignor


async def test_bad_group_requests_are_refused_and_change_nothing(api: API) -> None:
    """reliability-plan §6 item 27: empty ids and streams, caps, unknown group or member."""
    await _create(api, "s", 2)
    bad_joins = [
        (api_pb2.JoinConsumerGroupRequest(consumerId="c", streams=["s"]), "No groupId provided"),
        (api_pb2.JoinConsumerGroupRequest(groupId="g", streams=["s"]), "No consumerId provided"),
        (api_pb2.JoinConsumerGroupRequest(groupId="g", consumerId="c"), "No streams provided"),
        (api_pb2.JoinConsumerGroupRequest(groupId="g" * 256, consumerId="c", streams=["s"]), ""),
        (api_pb2.JoinConsumerGroupRequest(groupId="g\n1", consumerId="c", streams=["s"]), ""),
        (api_pb2.JoinConsumerGroupRequest(groupId="g", consumerId="c\x1b", streams=["s"]), ""),
        (api_pb2.JoinConsumerGroupRequest(groupId="g", consumerId="c", streams=["../x"]), ""),
        (api_pb2.JoinConsumerGroupRequest(groupId="g", consumerId="c", streams=["__cursors"]), ""),
        (
            api_pb2.JoinConsumerGroupRequest(
                groupId="g", consumerId="c", streams=["s"], assignor="sticky"
            ),
            "unknown assignor",
        ),
    ]
    for request, text in bad_joins:
        error = await _refused(api.JoinConsumerGroup(request, timeout=DEADLINE_S))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert text in (error.details() or "")
    for call in (
        api.LeaveConsumerGroup(api_pb2.LeaveConsumerGroupRequest(groupId="g")),
        api.FetchConsumerGroupAssignments(
            api_pb2.FetchConsumerGroupAssignmentsRequest(consumerId="c")
        ),
        api.ReportConsumerGroupCoordinator(
            api_pb2.ReportConsumerGroupCoordinatorRequest(groupId="g", consumerId="c")
        ),
    ):
        assert (await _refused(call)).code() == grpc.StatusCode.INVALID_ARGUMENT
    # Unknown group, and a stranger to an existing one.
    unknown = await _refused(
        api.LeaveConsumerGroup(api_pb2.LeaveConsumerGroupRequest(groupId="g", consumerId="c"))
    )
    assert (unknown.code(), _reason(unknown)) == (grpc.StatusCode.NOT_FOUND, "group-not-found")
    listed = await api.ListConsumerGroups(api_pb2.ListConsumerGroupsRequest(), timeout=DEADLINE_S)
    assert list(listed.groups) == []
    joined = await _join(api, "member", ["s"], group="g")
    for call in (
        api.LeaveConsumerGroup(
            api_pb2.LeaveConsumerGroupRequest(groupId="g", consumerId="stranger")
        ),
        api.FetchConsumerGroupAssignments(
            api_pb2.FetchConsumerGroupAssignmentsRequest(
                groupId="g", consumerId="stranger", epoch=joined.epoch
            )
        ),
    ):
        error = await _refused(call)
        assert (error.code(), _reason(error)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "not-group-member",
        )
    stale_report = await _refused(
        api.ReportConsumerGroupCoordinator(
            api_pb2.ReportConsumerGroupCoordinatorRequest(
                groupId="g", consumerId="member", coordinator="elsewhere", epoch=joined.epoch
            )
        )
    )
    assert (stale_report.code(), _reason(stale_report)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "not-coordinator",
    )
    assert (await _epoch(api, "g")) == joined.epoch  # nothing moved
    # A report naming the current coordinator and epoch is accepted.
    await api.ReportConsumerGroupCoordinator(
        api_pb2.ReportConsumerGroupCoordinatorRequest(
            groupId="g", consumerId="member", coordinator=joined.coordinator, epoch=joined.epoch
        ),
        timeout=DEADLINE_S,
    )
    assert (await _epoch(api, "g")) == joined.epoch


async def _activity(api: API) -> list[api_pb2.ActivityStreamEvent]:
    events = []
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream="__activity", startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST
        ),
        timeout=DEADLINE_S,
    )
    with contextlib.suppress(grpc.aio.AioRpcError):  # STOP_REACHED ends it
        async for message in call:
            if message.value:
                events.append(api_pb2.ActivityStreamEvent.FromString(message.value))
    return events


async def test_a_silent_member_expires_and_joins_and_leaves_reach_the_activity_stream(
    broker_factory: BrokerFactory,
) -> None:
    broker = await broker_factory(env={**FAST, "FLUX_ACTIVITY_STREAM_ENABLED": "true"})
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s", 4)
        started = time.monotonic()  # silent's clock starts with its join
        await _join(api, "silent", ["s"])
        await _join(api, "alive", ["s"])

        async def alive_owns_everything() -> bool:
            _, assigned = await _fetch(api, "alive")  # also alive's heartbeat
            return assigned == {"s": (0, 1, 2, 3)}

        await wait_for(alive_owns_everything, timeout_s=10.0, interval_s=0.2)
        assert time.monotonic() - started >= 0.9  # not before the timeout
        described = await _describe(api)
        assert [m.consumerId for m in described.members] == ["alive"]

        async def events() -> list[tuple[int, str, bool]]:
            found: list[tuple[int, str, bool]] = []
            for event in await _activity(api):
                if event.op == api_pb2.JOIN_CONSUMER_GROUP:
                    found.append((event.op, event.joinConsumerGroupOp.consumerId, False))
                elif event.op == api_pb2.LEAVE_CONSUMER_GROUP:
                    op = event.leaveConsumerGroupOp
                    found.append((event.op, op.consumerId, op.expired))
            return found

        expected = [
            (api_pb2.JOIN_CONSUMER_GROUP, "silent", False),
            (api_pb2.JOIN_CONSUMER_GROUP, "alive", False),
            (api_pb2.LEAVE_CONSUMER_GROUP, "silent", True),
        ]

        async def reported() -> bool:
            return await events() == expected

        await wait_for(reported, timeout_s=10.0, interval_s=0.2)


async def test_groups_and_ownership_survive_a_restart(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory()
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s", 3)
        await _join(api, "a", ["s"])
        await _join(api, "b", ["s"])  # a still owns b's partitions: they are being revoked
        before = await _describe(api)
    assert any(p.revoking for p in before.partitions)
    await broker.stop()
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        after = await _describe(api)
        assert after == before
        assert await _epoch(api) == before.epoch
        # The revocation continues where it was: a confirms, then b gets its share.
        await _fetch(api, "a")
        _, assigned_b = await _fetch(api, "b")
        assert assigned_b == {"s": (1,)}


async def test_a_revocation_not_confirmed_moves_on_after_the_revoke_timeout(
    broker_factory: BrokerFactory,
) -> None:
    broker = await broker_factory(
        env={"FLUX_GROUPS_REVOKE_TIMEOUT": "1s", "FLUX_GROUPS_CONSUMER_TIMEOUT": "30s"}
    )
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s", 2)
        await _join(api, "a", ["s"])
        await _join(api, "b", ["s"])
        started = time.monotonic()
        assert (await _fetch(api, "b"))[1] == {}

        async def b_has_its_share() -> bool:
            return (await _fetch(api, "b"))[1] == {"s": (1,)}

        await wait_for(b_has_its_share, timeout_s=10.0, interval_s=0.1)
        assert time.monotonic() - started >= 0.9


async def _watch(
    api: API, consumer: str, updates: asyncio.Queue[api_pb2.ConsumerGroupAssignmentUpdate]
) -> None:
    call = api.WatchConsumerGroupAssignments(
        api_pb2.WatchConsumerGroupAssignmentsRequest(groupId=GROUP, consumerId=consumer)
    )
    async for update in call:
        await updates.put(update)


async def _next(
    updates: asyncio.Queue[api_pb2.ConsumerGroupAssignmentUpdate],
) -> api_pb2.ConsumerGroupAssignmentUpdate:
    return await asyncio.wait_for(updates.get(), DEADLINE_S)


def _as_dict(assignments: object) -> Assigned:
    return {a.stream: tuple(a.partitions) for a in assignments}  # type: ignore[attr-defined]


async def test_push_members_get_changes_at_once_and_confirm_revocations(api: API) -> None:
    await _create(api, "s", 4)
    await _join(api, "a", ["s"])
    a_updates: asyncio.Queue[api_pb2.ConsumerGroupAssignmentUpdate] = asyncio.Queue()
    b_updates: asyncio.Queue[api_pb2.ConsumerGroupAssignmentUpdate] = asyncio.Queue()
    watch_a = asyncio.create_task(_watch(api, "a", a_updates))
    try:
        first = await _next(a_updates)
        assert _as_dict(first.assignments) == {"s": (0, 1, 2, 3)}
        assert list(first.revoked) == []
        await _join(api, "b", ["s"])
        revoked = await _next(a_updates)
        assert _as_dict(revoked.assignments) == {"s": (0, 2)}
        assert _as_dict(revoked.revoked) == {"s": (1, 3)}
        assert _as_dict(revoked.revoking) == {"s": (1, 3)}
        watch_b = asyncio.create_task(_watch(api, "b", b_updates))
        try:
            assert _as_dict((await _next(b_updates)).assignments) == {}
            # a confirms at once, with the epoch of the update.
            await api.FetchConsumerGroupAssignments(
                api_pb2.FetchConsumerGroupAssignmentsRequest(
                    groupId=GROUP, consumerId="a", epoch=revoked.epoch
                ),
                timeout=DEADLINE_S,
            )
            settled = await _next(a_updates)  # the confirmation moved the epoch on
            assert (_as_dict(settled.revoked), _as_dict(settled.revoking)) == ({}, {})
            granted = await _next(b_updates)
            assert _as_dict(granted.assignments) == {"s": (1, 3)}
            assert granted.epoch > revoked.epoch
            described = await _describe(api)
            assert {m.consumerId: m.watching for m in described.members} == {"a": True, "b": True}
            # A clean leave hands b's partitions to a without any revocation.
            await api.LeaveConsumerGroup(
                api_pb2.LeaveConsumerGroupRequest(groupId=GROUP, consumerId="b"),
                timeout=DEADLINE_S,
            )
            update = await _next(a_updates)
            while _as_dict(update.assignments) != {"s": (0, 1, 2, 3)}:
                update = await _next(a_updates)
            # b's watch ends: it is no longer a member.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(watch_b, DEADLINE_S)
            assert _reason(ended.value) == "not-group-member"
        finally:
            watch_b.cancel()
    finally:
        watch_a.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await watch_a


async def test_an_open_watch_is_the_members_heartbeat(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env=FAST)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s", 1)
        await _join(api, "pushed", ["s"])
        updates: asyncio.Queue[api_pb2.ConsumerGroupAssignmentUpdate] = asyncio.Queue()
        watch = asyncio.create_task(_watch(api, "pushed", updates))
        await _next(updates)
        await _join(api, "polled", ["s"])
        # A consumer timeout: the silent poller goes, the watching member stays.
        await wait_for(lambda: _members_are(api, ["pushed"]), timeout_s=10.0, interval_s=0.2)
        await asyncio.sleep(0)  # let the watch deliver what it has
        assert watch.done() is False
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await watch
        # Without its watch, the member expires too.
        await wait_for(lambda: _members_are(api, []), timeout_s=10.0, interval_s=0.2)


async def _members_are(api: API, expected: list[str]) -> bool:
    return [m.consumerId for m in (await _describe(api)).members] == expected


async def test_commits_carrying_a_member_are_checked_against_ownership(api: API) -> None:
    await _create(api, "s", 2)
    for _ in range(5):
        await api.Publish(
            api_pb2.PublishRequest(stream="s", value=b"x", ackPolicy=api_pb2.LEADER),
            timeout=DEADLINE_S,
        )
    joined_a = await _join(api, "a", ["s"])

    def commit(consumer: str, epoch: int, offset: int, cursor: str = "") -> Any:
        return api.SetCursor(
            api_pb2.SetCursorRequest(
                stream="s",
                partition=0,
                cursorId=cursor,
                offset=offset,
                consumer=api_pb2.Consumer(groupId=GROUP, consumerId=consumer, groupEpoch=epoch),
            ),
            timeout=DEADLINE_S,
        )

    async def committed() -> int:
        response = await api.FetchCursor(
            api_pb2.FetchCursorRequest(stream="s", partition=0, cursorId=f"__group:{GROUP}"),
            timeout=DEADLINE_S,
        )
        return int(response.offset)

    await commit("a", joined_a.epoch, 1)
    assert await committed() == 1
    joined_b = await _join(api, "b", ["s"])
    # b does not own partition 0; a still does (partition 1 is being revoked from a).
    refused = await _refused(commit("b", joined_b.epoch, 3))
    assert (refused.code(), _reason(refused)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "not-partition-owner",
    )
    stranger = await _refused(commit("x", joined_b.epoch, 3))
    assert _reason(stranger) == "not-group-member"
    wrong_cursor = await _refused(commit("a", joined_b.epoch, 3, cursor="mine"))
    assert wrong_cursor.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await committed() == 1
    await commit("a", joined_b.epoch, 2, cursor=f"__group:{GROUP}")
    assert await committed() == 2
    # A plain SetCursor (the Go client's checkpoint) is never checked.
    await api.SetCursor(
        api_pb2.SetCursorRequest(stream="s", partition=0, cursorId=f"__group:{GROUP}", offset=4),
        timeout=DEADLINE_S,
    )
    assert await committed() == 4


async def test_a_revoked_member_may_commit_until_it_confirms(api: API) -> None:
    await _create(api, "s", 2)
    await api.Publish(
        api_pb2.PublishRequest(stream="s", partition=1, value=b"x", ackPolicy=api_pb2.LEADER),
        timeout=DEADLINE_S,
    )
    await _join(api, "a", ["s"])
    joined_b = await _join(api, "b", ["s"])
    request = api_pb2.SetCursorRequest(
        stream="s",
        partition=1,
        offset=0,
        consumer=api_pb2.Consumer(groupId=GROUP, consumerId="a", groupEpoch=joined_b.epoch),
    )
    await api.SetCursor(request, timeout=DEADLINE_S)  # revoking: still a's to commit
    await _fetch(api, "a")  # confirms
    after = await _refused(api.SetCursor(request, timeout=DEADLINE_S))
    assert _reason(after) == "not-partition-owner"
    epoch, assigned = await _fetch(api, "b")
    assert assigned == {"s": (1,)}
    request.consumer.consumerId = "b"
    request.consumer.groupEpoch = epoch
    await api.SetCursor(request, timeout=DEADLINE_S)


async def _subscribe(api: API, consumer: str, epoch: int) -> Any:
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream="s",
            partition=0,
            startPosition=api_pb2.EARLIEST,
            consumer=api_pb2.Consumer(groupId=GROUP, consumerId=consumer, groupEpoch=epoch),
        )
    )
    await call.read()  # the handshake (or the refusal)
    return call


async def test_group_subscriptions_are_fenced_by_epoch(api: API) -> None:
    await _create(api, "s", 1)
    first = await _subscribe(api, "a", 7)
    older = await _refused(_subscribe(api, "b", 6))
    assert (older.code(), _reason(older)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "group-fenced",
    )
    # Another group is not affected; an equal epoch of the same group replaces the holder.
    other = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream="s",
            consumer=api_pb2.Consumer(groupId="other", consumerId="a", groupEpoch=1),
        )
    )
    await other.read()
    second = await _subscribe(api, "b", 7)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(first.read(), DEADLINE_S)
    assert (ended.value.code(), _reason(ended.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "group-fenced",
    )
    await api.Publish(
        api_pb2.PublishRequest(stream="s", value=b"hello", ackPolicy=api_pb2.LEADER),
        timeout=DEADLINE_S,
    )
    message = await asyncio.wait_for(second.read(), DEADLINE_S)
    assert message.value == b"hello"
    other_message: Any = await asyncio.wait_for(other.read(), DEADLINE_S)
    assert other_message.value == b"hello"
    second.cancel()
    other.cancel()


async def test_describe_and_reset_positions(api: API) -> None:
    await _create(api, "s", 2)
    for i in range(10):
        await api.Publish(
            api_pb2.PublishRequest(stream="s", value=b"%d" % i, ackPolicy=api_pb2.LEADER),
            timeout=DEADLINE_S,
        )
    joined = await _join(api, "a", ["s"])
    await api.SetCursor(
        api_pb2.SetCursorRequest(
            stream="s",
            partition=0,
            offset=3,
            consumer=api_pb2.Consumer(groupId=GROUP, consumerId="a", groupEpoch=joined.epoch),
        ),
        timeout=DEADLINE_S,
    )
    described = await _describe(api)
    rows = {p.partition: p for p in described.partitions}
    assert (rows[0].owner, rows[0].committedOffset, rows[0].highWatermark, rows[0].lag) == (
        "a",
        3,
        9,
        6,
    )
    assert (rows[1].committedOffset, rows[1].lag) == (-1, 0)

    def reset(**fields: Any) -> Any:
        return api.ResetConsumerGroupPositions(
            api_pb2.ResetConsumerGroupPositionsRequest(groupId=GROUP, stream="s", **fields),
            timeout=DEADLINE_S,
        )

    busy = await _refused(reset(position=api_pb2.RESET_EARLIEST))
    assert (busy.code(), _reason(busy)) == (grpc.StatusCode.FAILED_PRECONDITION, "group-not-empty")
    assert rows[0].committedOffset == (await _describe(api)).partitions[0].committedOffset
    await api.LeaveConsumerGroup(
        api_pb2.LeaveConsumerGroupRequest(groupId=GROUP, consumerId="a"), timeout=DEADLINE_S
    )
    latest = await reset(position=api_pb2.RESET_LATEST)
    assert [(p.partition, p.committedOffset, p.lag) for p in latest.partitions] == [
        (0, 9, 0),
        (1, -1, 0),
    ]
    offset = await reset(position=api_pb2.RESET_OFFSET, resetOffset=5, partitions=[0])
    assert [(p.partition, p.committedOffset) for p in offset.partitions] == [(0, 4)]
    earliest = await reset(position=api_pb2.RESET_EARLIEST, partitions=[0])
    assert [p.committedOffset for p in earliest.partitions] == [-1]
    future = await reset(position=api_pb2.RESET_TIMESTAMP, resetTimestamp=2**62)
    assert [p.committedOffset for p in future.partitions] == [9, -1]
    for fields, code in (
        ({"position": api_pb2.RESET_OFFSET, "resetOffset": 11}, grpc.StatusCode.OUT_OF_RANGE),
        ({"position": api_pb2.RESET_OFFSET, "resetOffset": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"position": 9}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"partitions": [2]}, grpc.StatusCode.NOT_FOUND),
    ):
        assert (await _refused(reset(**fields))).code() == code
    unknown = await _refused(
        api.ResetConsumerGroupPositions(
            api_pb2.ResetConsumerGroupPositionsRequest(groupId="nobody", stream="s"),
            timeout=DEADLINE_S,
        )
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    # The group, emptied, can be joined again; its epoch keeps growing.
    again = await _join(api, "a", ["s"])
    assert again.epoch > joined.epoch


async def test_deleting_a_stream_takes_its_partitions_out_of_the_assignment(api: API) -> None:
    await _create(api, "s", 2)
    await _create(api, "t", 1)
    await _join(api, "a", ["s", "t"])
    assert (await _fetch(api, "a"))[1] == {"s": (0, 1), "t": (0,)}
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name="t"), timeout=DEADLINE_S)

    async def only_s() -> bool:
        return (await _fetch(api, "a"))[1] == {"s": (0, 1)}

    await wait_for(only_s, timeout_s=10.0, interval_s=0.1)
    await _create(api, "t", 3)

    async def t_again() -> bool:
        return (await _fetch(api, "a"))[1] == {"s": (0, 1), "t": (0, 1, 2)}

    await wait_for(t_again, timeout_s=10.0, interval_s=0.1)


_CONSUMER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import grpc
    from flux_proto import api_pb2, api_pb2_grpc

    async def main(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            api = api_pb2_grpc.APIStub(channel)
            await api.JoinConsumerGroup(api_pb2.JoinConsumerGroupRequest(
                groupId="workers", consumerId="doomed", streams=["s"]), timeout=10)
            print("joined", flush=True)
            async for _ in api.WatchConsumerGroupAssignments(
                api_pb2.WatchConsumerGroupAssignmentsRequest(
                    groupId="workers", consumerId="doomed")):
                pass

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_a_consumer_killed_with_sigkill_loses_its_partitions_after_the_timeout(
    broker_factory: BrokerFactory,
) -> None:
    broker = await broker_factory(env={"FLUX_GROUPS_CONSUMER_TIMEOUT": "3s"})
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s", 4)
        await _join(api, "survivor", ["s"])

        async def heartbeat() -> None:
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await _fetch(api, "survivor")
                await asyncio.sleep(0.2)

        beating = asyncio.create_task(heartbeat())
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CONSUMER_SCRIPT, broker.address, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30.0)
            assert line.strip() == b"joined"
            await wait_for(lambda: _watching(api, "doomed"), timeout_s=10.0, interval_s=0.1)
            await wait_for(lambda: _settled(api), timeout_s=10.0, interval_s=0.1)
            os.kill(process.pid, signal.SIGKILL)
            killed = time.monotonic()

            async def survivor_owns_everything() -> bool:
                return (await _fetch(api, "survivor"))[1] == {"s": (0, 1, 2, 3)}

            await wait_for(survivor_owns_everything, timeout_s=20.0, interval_s=0.1)
            assert time.monotonic() - killed >= 2.9
        finally:
            beating.cancel()
            if process.returncode is None:
                process.kill()
            await asyncio.wait_for(process.wait(), 10.0)


async def _watching(api: API, consumer: str) -> bool:
    return any(m.consumerId == consumer and m.watching for m in (await _describe(api)).members)


async def test_a_timeout_that_is_not_above_zero_stops_start_up(
    broker_factory: BrokerFactory,
) -> None:
    with pytest.raises(BrokerProcessError, match=r"groups\.revoke\.timeout must be above 0"):
        await broker_factory(env={"FLUX_GROUPS_REVOKE_TIMEOUT": "0s"})


async def test_group_settings_are_supported_not_warned(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(
        env={"FLUX_GROUPS_CONSUMER_TIMEOUT": "5s", "FLUX_GROUPS_COORDINATOR_TIMEOUT": "7s"}
    )
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s", 1)
        joined = await _join(api, "a", ["s"])
    assert (joined.consumerTimeout, joined.coordinatorTimeout) == (5 * 10**9, 7 * 10**9)
    assert "groups.consumer.timeout" not in broker.output()
    assert "groups.coordinator.timeout" not in broker.output()


async def _settled(api: API) -> bool:
    described = await _describe(api)
    return not any(member.revoking for member in described.members)


async def test_revocations_of_one_rebalance_finish_together_in_one_epoch(api: API) -> None:
    await _create(api, "s", 6)
    await _join(api, "a", ["s"])
    await _join(api, "b", ["s"])
    await _fetch(api, "a")  # a lets b's half go
    assert (await _fetch(api, "b"))[1] == {"s": (1, 3, 5)}
    joined = await _join(api, "c", ["s"])
    described = await _describe(api)
    # Least-loaded from scratch: a 0,3; b 1,4; c 2,5.
    assert {m.consumerId: _as_dict(m.revoking) for m in described.members} == {
        "a": {"s": (2, 4)},
        "b": {"s": (3, 5)},
        "c": {},
    }
    # a confirms: nothing moves yet, the epoch stays (b still owns what it must give up).
    epoch, assigned_a = await _fetch(api, "a")
    assert (epoch, assigned_a) == (joined.epoch, {"s": (0,)})
    assert (await _fetch(api, "c"))[1] == {}
    # a confirmed: it may no longer commit what it let go.
    refused = await _refused(
        api.SetCursor(
            api_pb2.SetCursorRequest(
                stream="s",
                partition=4,
                offset=-1,
                consumer=api_pb2.Consumer(groupId=GROUP, consumerId="a", groupEpoch=epoch),
            ),
            timeout=DEADLINE_S,
        )
    )
    assert _reason(refused) == "not-partition-owner"
    # b confirms: all four partitions move in one new epoch.
    epoch_b, assigned_b = await _fetch(api, "b")
    assert epoch_b > joined.epoch
    assert assigned_b == {"s": (1, 4)}
    assert await _fetch(api, "c") == (epoch_b, {"s": (2, 5)})
    assert await _fetch(api, "a") == (epoch_b, {"s": (0, 3)})
