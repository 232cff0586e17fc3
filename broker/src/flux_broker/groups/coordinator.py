"""The group coordinator: runs every consumer group of this broker.

It keeps each group's :class:`~flux_broker.groups.state.GroupState` in memory, stores every
change in the metadata store before anyone sees it (``PutConsumerGroup``, applied at the index
equal to the new epoch), and keeps what is not durable:

* **liveness**: a member that neither fetches its assignment
  (``FetchConsumerGroupAssignments``) nor holds a ``WatchConsumerGroupAssignments`` call open
  for ``groups.consumer.timeout`` is removed (``LeaveConsumerGroup`` with ``expired``). After a
  restart every member gets a whole timeout from the moment the broker is up again;
* **revocations**: a partition being revoked moves on when its owner confirms (it fetches its
  assignment at an epoch at least the revocation's) or after ``groups.revoke.timeout``; a
  restart starts that clock again;
* **watchers**: the open push calls, woken after every change.

One lock serialises every change, so a change is computed from the state it replaces, and a
member-checked commit (:meth:`GroupCoordinator.committing`) or a reset runs while no change can
move the partition. The work is small (a group is one row per member and per partition), and
each change costs one SQLite transaction.

A single broker is a cluster of one: it coordinates every group. A coordinator report
(``ReportConsumerGroupCoordinator``) is checked and counted; a majority of reports would move
the group to another broker, of which a cluster of one has none, so it is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from flux_broker.groups.assignor import DEFAULT_ASSIGNOR, PartitionKey
from flux_broker.groups.errors import (
    GroupAssignorMismatchError,
    GroupEpochMismatchError,
    GroupNotEmptyError,
    GroupNotFoundError,
    GroupsFullError,
    NotCoordinatorError,
    NotGroupMemberError,
    NotPartitionOwnerError,
)
from flux_broker.groups.fencing import GroupSubscriptions
from flux_broker.groups.state import (
    GroupState,
    complete,
    join,
    leave,
    new_group,
    rebalance,
)
from flux_broker.metadata import (
    AppliedCommand,
    CreateStream,
    DeleteStream,
    MetadataStore,
    StaleIndexError,
)
from flux_broker.metadata.commands import (
    ForgetConsumerGroup,
    GroupJoined,
    GroupLeft,
    PutConsumerGroup,
)
from flux_broker.nats.subjects import shown

__all__ = [
    "EMPTY_GROUPS_MAX_COUNT",
    "GROUPS_MAX_COUNT",
    "GROUP_MEMBERS_MAX_COUNT",
    "AssignmentUpdate",
    "GroupCoordinator",
    "GroupStats",
    "GroupTimeouts",
]

_logger = logging.getLogger(__name__)

#: Most groups with members on a broker; a join that would make one more is refused with
#: RESOURCE_EXHAUSTED.
GROUPS_MAX_COUNT: Final = 10_000
#: Most members of one group; a join that would add one more is refused the same way.
GROUP_MEMBERS_MAX_COUNT: Final = 1_000
#: Tries to store a change when another metadata command took the index first.
_INDEX_RACE_TRIES: Final = 16
#: Longest sleep of the liveness loop: it also re-checks on every change.
_REAPER_MAX_SLEEP_S: Final = 1.0
#: How often a stream just created is checked for being open, to rebalance onto it.
_CREATE_POLL_S: Final = 0.02
#: How long a created stream may take to open before its groups are rebalanced anyway.
_CREATE_WAIT_MAX_S: Final = 30.0
#: Longest pause of the liveness loop after checks that failed (it backs off to it).
_REAPER_MAX_BACKOFF_S: Final = 5.0
#: Most groups without members kept (for describe and reset); the oldest beyond go.
EMPTY_GROUPS_MAX_COUNT: Final = 10_000
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class GroupTimeouts:
    """The ``groups.*`` durations, in seconds; each must be above 0."""

    consumer_s: float = 15.0
    coordinator_s: float = 15.0
    revoke_s: float = 15.0

    def __post_init__(self) -> None:
        """Refuse a timeout that is not above 0 (members would expire at once)."""
        for name, value in (
            ("groups.consumer.timeout", self.consumer_s),
            ("groups.coordinator.timeout", self.coordinator_s),
            ("groups.revoke.timeout", self.revoke_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be above 0, got {value:g}s")


@dataclass(slots=True)
class GroupStats:
    """Counters of the coordinator since the broker started (exported as metrics).

    Attributes:
        changes: Group changes stored (each one a new epoch: joins, leaves, rebalances,
            finished revocations).
        expired_members: Members removed for missing their heartbeats.
        revocations_timed_out: Revocations finished by ``groups.revoke.timeout`` instead of a
            confirmation.
    """

    changes: int = 0
    expired_members: int = 0
    revocations_timed_out: int = 0


@dataclass(frozen=True, slots=True)
class AssignmentUpdate:
    """One push to a watching member.

    Attributes:
        epoch: The group epoch.
        assignments: Everything the member should read now, stream -> partition ids.
        revoked: What was taken away since the previous update, stream -> partition ids.
        revoking: What is being revoked from the member and awaits its confirmation.
    """

    epoch: int
    assignments: Mapping[str, tuple[int, ...]]
    revoked: Mapping[str, tuple[int, ...]]
    revoking: Mapping[str, tuple[int, ...]]


class GroupCoordinator:
    """Every consumer group of this broker; :meth:`load`, then :meth:`start`."""

    def __init__(
        self,
        *,
        broker_id: str,
        store: MetadataStore,
        partition_counts: Callable[[], Mapping[str, int]],
        notify_applied: Callable[[AppliedCommand], None],
        timeouts: GroupTimeouts,
        monotonic: Callable[[], float] = time.monotonic,
        max_groups: int = GROUPS_MAX_COUNT,
        max_empty_groups: int = EMPTY_GROUPS_MAX_COUNT,
    ) -> None:
        """Describe the coordinator.

        Args:
            broker_id: This broker's id: the coordinator of every group.
            store: The metadata store groups are kept in.
            partition_counts: Stream name -> partition count of the streams that exist now.
            notify_applied: Called after each stored change (wakes the activity publisher).
            timeouts: The ``groups.*`` timeouts.
            monotonic: The clock of timeouts.
            max_groups: Most groups with members.
            max_empty_groups: Most groups without members kept.
        """
        self.broker_id = broker_id
        self.timeouts = timeouts
        self.subscriptions = GroupSubscriptions()
        self.stats = GroupStats()
        self._store = store
        self._partition_counts = partition_counts
        self._notify_applied = notify_applied
        self._monotonic = monotonic
        self._max_groups = max_groups
        self._max_empty_groups = max_empty_groups
        self._groups: dict[str, GroupState] = {}
        self._lock = asyncio.Lock()
        self._heartbeat: dict[tuple[str, str], float] = {}  # (group, member) -> last seen
        self._watching: dict[tuple[str, str], int] = {}  # (group, member) -> open watches
        self._watchers: dict[str, set[asyncio.Event]] = {}  # group -> wake-ups
        self._revoke_started: dict[tuple[str, PartitionKey], float] = {}
        #: Revocations their owner confirmed, waiting for the group's others (not durable: after
        #: a restart owners confirm again).
        self._confirmed: set[tuple[str, PartitionKey]] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._failures = 0  # liveness checks failed in a row (for the back-off)
        self._reports: dict[str, dict[str, float]] = {}  # group -> member -> report time
        self._dirty_streams: set[str] = set()
        self._pending_rebalance: set[str] = set()  # changed streams whose groups wait
        #: stream -> (partitions, when) of streams created but not yet open.
        self._creating: dict[str, tuple[int, float]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------

    async def load(self) -> int:
        """Read the stored groups; every member gets a whole timeout from now."""
        now = self._monotonic()
        for state in await self._store.list_groups():
            self._groups[state.group_id] = state
            for consumer in state.members:
                self._heartbeat[state.group_id, consumer] = now
            for key, own in state.owners.items():
                if own.revoking:
                    self._revoke_started[state.group_id, key] = now
        # Streams may have been deleted or created while the broker was down.
        self._dirty_streams.update(s for g in self._groups.values() for s in g.streams)
        if self._groups:
            _logger.info(
                "loaded %d consumer group(s), %d with members",
                len(self._groups),
                sum(1 for g in self._groups.values() if not g.empty),
            )
        return len(self._groups)

    def start(self) -> None:
        """Start expiring members and revocations."""
        self._task = asyncio.create_task(self._reap(), name="group-coordinator")

    async def close(self) -> None:
        """Stop the liveness loop and end every watch; idempotent."""
        self._closed = True
        for wakeups in self._watchers.values():
            for wake in wakeups:
                wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def on_applied(self, applied: AppliedCommand) -> None:
        """Note streams created or deleted: groups reading them are rebalanced soon."""
        command = applied.command
        if isinstance(command, CreateStream | DeleteStream):
            self._dirty_streams.add(command.name)
            if isinstance(command, CreateStream):
                # Applied before the stream is open: rebalance once it is live.
                self._creating[command.name] = (len(command.partitions), self._monotonic())
            else:
                self._creating.pop(command.name, None)
            self._wake.set()

    # -- reading ---------------------------------------------------------------------------

    def group(self, group_id: str) -> GroupState | None:
        """The group's state, if this broker has it (members or not)."""
        return self._groups.get(group_id)

    def groups(self) -> list[GroupState]:
        """Every group, by id."""
        return [self._groups[g] for g in sorted(self._groups)]

    def watching(self, group_id: str, consumer: str) -> bool:
        """Whether the member has a push call open."""
        return self._watching.get((group_id, consumer), 0) > 0

    # -- the Liftbridge calls --------------------------------------------------------------

    async def join(
        self, group_id: str, consumer: str, streams: Iterable[str], assignor: str = ""
    ) -> GroupState:
        """Add ``consumer`` (or update its streams); create the group if it has no members.

        Raises:
            GroupAssignorMismatchError: ``assignor`` is not the existing group's.
            GroupsFullError: The group is new and the broker keeps its limit of groups.
        """
        return await self._shielded(self._join(group_id, consumer, streams, assignor))

    async def _join(
        self, group_id: str, consumer: str, streams: Iterable[str], assignor: str
    ) -> GroupState:
        wanted = tuple(sorted(set(streams)))
        async with self._lock:
            state = self._groups.get(group_id)
            if state is None or state.empty:
                active = sum(1 for group in self._groups.values() if not group.empty)
                if active >= self._max_groups:
                    raise GroupsFullError(
                        f"this broker has {active} consumer groups with members, its limit"
                    )
                # An emptied group starts again with the assignor asked for now, keeping its
                # epoch (epochs only grow) and the streams its positions are for.
                base = new_group(group_id, assignor or DEFAULT_ASSIGNOR, self.broker_id)
                if state is not None:
                    base = replace(base, epoch=state.epoch, streams=state.streams)
            else:
                if assignor and assignor != state.assignor:
                    raise GroupAssignorMismatchError(
                        f"consumer group {shown(group_id)} uses the {state.assignor} assignor, "
                        f"not {assignor}"
                    )
                base = state
            if consumer not in base.members and len(base.members) >= GROUP_MEMBERS_MAX_COUNT:
                raise GroupsFullError(
                    f"consumer group {shown(group_id)} has {len(base.members)} members, its limit"
                )
            if base.members.get(consumer) != wanted:
                base = await self._change(
                    base,
                    lambda epoch: join(
                        base, consumer, wanted, epoch=epoch, partitions=self._partition_counts()
                    ),
                    GroupJoined(consumer, wanted),
                )
            # Only once it is a member: a failed join leaves no clock behind.
            self._heartbeat[group_id, consumer] = self._monotonic()
            return base

    async def leave(self, group_id: str, consumer: str, *, expired: bool = False) -> GroupState:
        """Remove ``consumer``; its partitions go to the others at once.

        Raises:
            GroupNotFoundError: No group with members has this id.
            NotGroupMemberError: The consumer is not a member.
        """
        return await self._shielded(self._leave(group_id, consumer, expired=expired))

    async def _leave(self, group_id: str, consumer: str, *, expired: bool) -> GroupState:
        async with self._lock:
            return await self._remove(self._member_group(group_id, consumer), consumer, expired)

    async def _remove(self, state: GroupState, consumer: str, expired: bool) -> GroupState:
        """Store the member's departure (lock held); its heartbeat goes once that is stored."""
        return await self._change(
            state,
            lambda epoch: leave(state, consumer, epoch=epoch, partitions=self._partition_counts()),
            GroupLeft(consumer, expired),
        )

    async def fetch(
        self, group_id: str, consumer: str, epoch: int
    ) -> tuple[int, dict[str, tuple[int, ...]]]:
        """The member's heartbeat and assignment; confirms its revocations up to ``epoch``.

        Raises:
            GroupNotFoundError: No group with members has this id.
            NotCoordinatorError: This broker is not the coordinator.
            GroupEpochMismatchError: ``epoch`` is not the current epoch.
            NotGroupMemberError: The consumer is not a member.
        """
        return await self._shielded(self._fetch(group_id, consumer, epoch))

    async def _fetch(
        self, group_id: str, consumer: str, epoch: int
    ) -> tuple[int, dict[str, tuple[int, ...]]]:
        async with self._lock:
            state = self._groups.get(group_id)
            if state is None or state.empty:
                raise _no_group(group_id)
            if state.coordinator != self.broker_id:
                raise NotCoordinatorError(
                    f"this broker is not the coordinator of {shown(group_id)}"
                )
            if epoch != state.epoch:
                raise GroupEpochMismatchError(
                    f"epoch {epoch} is not the current epoch {state.epoch} of consumer group "
                    f"{shown(group_id)}; fetch the group metadata"
                )
            if consumer not in state.members:
                raise _not_member(group_id, consumer)
            self._heartbeat[group_id, consumer] = self._monotonic()
            for key, own in state.owners.items():
                if own.owner == consumer and own.revoking and own.revoke_epoch <= epoch:
                    self._confirmed.add((group_id, key))
            revoking = [key for key, own in state.owners.items() if own.revoking]
            if revoking and all((group_id, key) in self._confirmed for key in revoking):
                # Every owner has let go: all of them move in one epoch, so clients see one
                # change per rebalance, not one per confirmation.
                state = await self._change(state, self._completing(state, revoking))
            return state.epoch, state.assignment(consumer)

    async def report(self, group_id: str, consumer: str, coordinator: str, epoch: int) -> None:
        """A member reports that it cannot reach ``coordinator``.

        Raises:
            GroupNotFoundError: No group with members has this id.
            NotCoordinatorError: ``coordinator`` and ``epoch`` are not the current ones.
            NotGroupMemberError: The consumer is not a member.
        """
        async with self._lock:
            state = self._groups.get(group_id)
            if state is None or state.empty:
                raise _no_group(group_id)
            if coordinator != state.coordinator or epoch != state.epoch:
                raise NotCoordinatorError(
                    f"coordinator generation mismatch: the current coordinator is "
                    f"{shown(state.coordinator)} at epoch {state.epoch}, the report names "
                    f"{shown(coordinator)} at epoch {epoch}"
                )
            if consumer not in state.members:
                raise _not_member(group_id, consumer)
            now = self._monotonic()
            reports = self._reports.setdefault(group_id, {})
            reports[consumer] = now
            recent = [c for c, at in reports.items() if now - at <= self.timeouts.coordinator_s]
            if len(recent) * 2 > len(state.members):
                _logger.warning(
                    "a majority of consumer group %s reports its coordinator %s unreachable; "
                    "a cluster of one has no other broker to move it to",
                    shown(group_id),
                    shown(coordinator),
                )

    # -- the Flux calls --------------------------------------------------------------------

    async def watch(
        self, group_id: str, consumer: str, closing: asyncio.Event
    ) -> AsyncGenerator[AssignmentUpdate, None]:
        """The member's assignment now, then after every change, while it stays a member.

        Raises:
            GroupNotFoundError: No group with members has this id (checked first).
            NotGroupMemberError: The consumer is not (or no longer) a member.
        """
        self._member_group(group_id, consumer)
        key = (group_id, consumer)
        wake = asyncio.Event()
        self._watchers.setdefault(group_id, set()).add(wake)
        self._watching[key] = self._watching.get(key, 0) + 1
        shutdown = asyncio.ensure_future(closing.wait())
        shutdown.add_done_callback(lambda _done: wake.set())
        try:
            sent: dict[str, tuple[int, ...]] | None = None
            sent_epoch = -1
            while not closing.is_set() and not self._closed:
                state = self._groups.get(group_id)
                if state is None or consumer not in state.members:
                    raise NotGroupMemberError(
                        f"{shown(consumer)} is no longer a member of consumer group "
                        f"{shown(group_id)}"
                    )
                if state.epoch != sent_epoch:
                    assignments = state.assignment(consumer)
                    revoked = _removed(sent or {}, assignments)
                    sent, sent_epoch = assignments, state.epoch
                    yield AssignmentUpdate(
                        state.epoch, assignments, revoked, self._unconfirmed(state, consumer)
                    )
                    continue  # the state may have moved on while the update was written
                await wake.wait()
                wake.clear()
        finally:
            shutdown.cancel()
            self._watchers.get(group_id, set()).discard(wake)
            left = self._watching.get(key, 1) - 1
            if left > 0:
                self._watching[key] = left
            else:
                self._watching.pop(key, None)
                if key in self._heartbeat:
                    # The liveness clock starts when the push call ends.
                    self._heartbeat[key] = self._monotonic()
                    self._wake.set()

    @contextlib.asynccontextmanager
    async def committing(
        self, group_id: str, consumer: str, key: PartitionKey, epoch: int
    ) -> AsyncIterator[None]:
        """Hold ownership still while a member-checked commit is written.

        Raises:
            NotGroupMemberError: The consumer is not a member.
            NotPartitionOwnerError: It does not own the partition, or ``epoch`` predates its
                ownership.
        """
        async with self._lock:
            state = self._groups.get(group_id)
            if state is None or consumer not in state.members:
                raise _not_member(group_id, consumer)
            if (group_id, key) in self._confirmed:
                raise NotPartitionOwnerError(
                    f"{shown(consumer)} confirmed the revocation of stream {shown(key[0])} "
                    f"partition {key[1]} in consumer group {shown(group_id)}; it may no longer "
                    "commit it"
                )
            if not state.may_commit(consumer, key, epoch):
                own = state.owners.get(key)
                detail = (
                    "no member owns it"
                    if own is None
                    else f"{shown(own.owner)} owns it since epoch {own.since_epoch}"
                )
                raise NotPartitionOwnerError(
                    f"{shown(consumer)} may not commit stream {shown(key[0])} partition "
                    f"{key[1]} at epoch {epoch} in consumer group {shown(group_id)}: {detail}"
                )
            yield

    @contextlib.asynccontextmanager
    async def resetting(self, group_id: str) -> AsyncIterator[GroupState]:
        """Hold the group empty while its positions are rewritten.

        Raises:
            GroupNotFoundError: This broker has no group with this id.
            GroupNotEmptyError: The group has members.
        """
        async with self._lock:
            state = self._groups.get(group_id)
            if state is None:
                raise _no_group(group_id)
            if not state.empty:
                raise GroupNotEmptyError(
                    f"consumer group {shown(group_id)} has {len(state.members)} member(s); "
                    "positions can be reset only while it has none"
                )
            yield state

    # -- internals -------------------------------------------------------------------------

    def _member_group(self, group_id: str, consumer: str) -> GroupState:
        state = self._groups.get(group_id)
        if state is None or state.empty:
            raise _no_group(group_id)
        if consumer not in state.members:
            raise _not_member(group_id, consumer)
        return state

    async def _shielded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run a change to the end even if the caller is cancelled (a client's deadline).

        Cancelling it halfway would leave SQLite and memory apart: the store commits in its
        own thread whatever happens to the awaiting coroutine.
        """
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _change(
        self,
        old: GroupState,
        compute: Callable[[int], GroupState],
        event: GroupJoined | GroupLeft | None = None,
    ) -> GroupState:
        """Compute the next state at the next metadata index and store it (lock held)."""
        index = self._store.applied_index + 1
        for _ in range(_INDEX_RACE_TRIES):
            new = compute(index)
            if new is old:
                return old
            try:
                applied = await self._store.apply(
                    PutConsumerGroup(state=new, event=event), index=index
                )
            except StaleIndexError as error:
                # Another command took the index meanwhile: compute again after it.
                index = max(error.applied_index, self._store.applied_index) + 1
                continue
            self._install(old, new)
            self.stats.changes += 1
            self._notify_applied(applied)
            if new.empty:
                await self._forget_surplus()
            return new
        raise RuntimeError("the metadata index kept moving; the group change was not stored")

    async def _forget_surplus(self) -> None:
        """Forget the oldest groups without members beyond :data:`EMPTY_GROUPS_MAX_COUNT`.

        Their positions stay in ``__cursors``; a member joining one again continues from them.
        """
        empty = sorted((g.epoch, g.group_id) for g in self._groups.values() if g.empty)
        for _, group_id in empty[: max(len(empty) - self._max_empty_groups, 0)]:
            applied = await self._store.apply(ForgetConsumerGroup(group_id=group_id))
            del self._groups[group_id]
            self._notify_applied(applied)
            _logger.info("forgot consumer group %s, empty since long ago", shown(group_id))

    def _unconfirmed(self, state: GroupState, consumer: str) -> dict[str, tuple[int, ...]]:
        """What is being revoked from ``consumer`` and still needs its confirmation."""
        revoking = state.revoking(consumer)
        return {
            stream: left
            for stream, partitions in revoking.items()
            if (
                left := tuple(
                    p for p in partitions if (state.group_id, (stream, p)) not in self._confirmed
                )
            )
        }

    def _install(self, old: GroupState, new: GroupState) -> None:
        group_id = new.group_id
        self._groups[group_id] = new
        now = self._monotonic()
        for key, own in new.owners.items():
            was = old.owners.get(key)
            if own.revoking and (was is None or not was.revoking or was.owner != own.owner):
                self._revoke_started[group_id, key] = now
                self._confirmed.discard((group_id, key))
        for pending in [k for k in self._revoke_started if k[0] == group_id]:
            now_owned = new.owners.get(pending[1])
            if now_owned is None or not now_owned.revoking:
                del self._revoke_started[pending]
                self._confirmed.discard(pending)
        for consumer in set(old.members) - set(new.members):
            self._heartbeat.pop((group_id, consumer), None)
            self._reports.get(group_id, {}).pop(consumer, None)
        if new.empty:
            self._reports.pop(group_id, None)
        _logger.info(
            "consumer group %s epoch %d: %d member(s), %d partition(s) owned, %d being revoked",
            shown(group_id),
            new.epoch,
            len(new.members),
            len(new.owners),
            sum(1 for own in new.owners.values() if own.revoking),
        )
        for wake in self._watchers.get(group_id, ()):
            wake.set()
        self._wake.set()

    async def _reap(self) -> None:
        """Expire silent members and overdue revocations; rebalance after stream changes."""
        while True:
            self._wake.clear()
            delay_floor = _CREATE_POLL_S
            try:
                await self._reap_once()
                self._failures = 0
            except Exception:
                self._failures += 1
                _logger.exception("consumer group liveness check failed; retrying")
                # Back off, so a check that keeps failing (a full disk) neither spins nor floods
                # the log.
                delay_floor = min(_CREATE_POLL_S * 2**self._failures, _REAPER_MAX_BACKOFF_S)
            delay = max(self._next_due() - self._monotonic(), delay_floor)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), min(delay, max(_REAPER_MAX_SLEEP_S, delay_floor))
                )

    async def _reap_once(self) -> None:
        now = self._monotonic()
        for key in list(self._heartbeat):
            state = self._groups.get(key[0])
            if state is None or key[1] not in state.members:
                del self._heartbeat[key]  # not a member (any more): nothing to expire
        for group_id, consumer in [
            key
            for key, seen in self._heartbeat.items()
            if now - seen >= self.timeouts.consumer_s and not self._watching.get(key)
        ]:
            await self._expire(group_id, consumer)
        for group_id in sorted(
            {
                g
                for (g, _), started in self._revoke_started.items()
                if now - started >= self.timeouts.revoke_s
            }
        ):
            await self._time_out_revocations(group_id)
        self._rebalance_after_stream_changes()
        if self._pending_rebalance:
            await self._rebalance_dirty()

    async def _expire(self, group_id: str, consumer: str) -> None:
        """Remove a member whose heartbeat is overdue, if it still is under the lock."""
        async with self._lock:
            state = self._groups.get(group_id)
            seen = self._heartbeat.get((group_id, consumer))
            if state is None or consumer not in state.members or seen is None:
                return
            if self._watching.get((group_id, consumer)):
                return
            if self._monotonic() - seen < self.timeouts.consumer_s:
                return  # it fetched while this waited for the lock
            _logger.warning(
                "consumer %s of group %s sent no heartbeat for %.1fs: removing it",
                shown(consumer),
                shown(group_id),
                self.timeouts.consumer_s,
            )
            await self._remove(state, consumer, expired=True)
            self.stats.expired_members += 1

    async def _time_out_revocations(self, group_id: str) -> None:
        """Finish the group's overdue revocations, with those confirmed meanwhile, in one epoch."""
        async with self._lock:
            state = self._groups[group_id]
            now = self._monotonic()
            overdue = [
                key
                for (g, key), started in self._revoke_started.items()
                if g == group_id and now - started >= self.timeouts.revoke_s
            ]
            if not overdue:
                return  # confirmed or called off while this waited for the lock
            _logger.warning(
                "consumer group %s: %d revocation(s) not confirmed within %.1fs; the "
                "partitions move on",
                shown(group_id),
                len(overdue),
                self.timeouts.revoke_s,
            )
            confirmed = [key for g, key in self._confirmed if g == group_id]
            await self._change(state, self._completing(state, [*overdue, *confirmed]))
            self.stats.revocations_timed_out += len(overdue)

    def _rebalance_after_stream_changes(self) -> None:
        """Move the dirty streams to the pending rebalance once created ones are open."""
        counts = self._partition_counts()
        now = self._monotonic()
        for stream, (partitions, since) in list(self._creating.items()):
            if counts.get(stream) == partitions or now - since >= _CREATE_WAIT_MAX_S:
                del self._creating[stream]  # open (or its creation failed long ago)
        if self._dirty_streams and not self._creating:
            self._pending_rebalance |= self._dirty_streams
            self._dirty_streams = set()

    async def _rebalance_dirty(self) -> None:
        """Rebalance every group reading a changed stream; what fails stays pending."""
        dirty = frozenset(self._pending_rebalance)
        for group_id in sorted(self._groups):
            state = self._groups.get(group_id)
            if state is None or state.empty or not dirty.intersection(state.streams):
                continue
            async with self._lock:
                state = self._groups[group_id]
                await self._change(state, self._rebalancing(state))
        self._pending_rebalance -= dirty

    def _completing(
        self, state: GroupState, keys: list[PartitionKey]
    ) -> Callable[[int], GroupState]:
        return lambda epoch: complete(state, keys, epoch=epoch, partitions=self._partition_counts())

    def _rebalancing(self, state: GroupState) -> Callable[[int], GroupState]:
        return lambda epoch: rebalance(state, epoch=epoch, partitions=self._partition_counts())

    def _next_due(self) -> float:
        due = self._monotonic() + _REAPER_MAX_SLEEP_S
        for key, seen in self._heartbeat.items():
            if not self._watching.get(key):
                due = min(due, seen + self.timeouts.consumer_s)
        for started in self._revoke_started.values():
            due = min(due, started + self.timeouts.revoke_s)
        if self._creating or self._pending_rebalance:
            due = min(due, self._monotonic() + _CREATE_POLL_S)
        return due


def _no_group(group_id: str) -> GroupNotFoundError:
    return GroupNotFoundError(f"no consumer group {shown(group_id)}")


def _not_member(group_id: str, consumer: str) -> NotGroupMemberError:
    return NotGroupMemberError(
        f"{shown(consumer)} is not a member of consumer group {shown(group_id)}"
    )


def _removed(
    before: Mapping[str, tuple[int, ...]], after: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    removed: dict[str, tuple[int, ...]] = {}
    for stream, partitions in before.items():
        kept = set(after.get(stream, ()))
        gone = tuple(p for p in partitions if p not in kept)
        if gone:
            removed[stream] = gone
    return removed
