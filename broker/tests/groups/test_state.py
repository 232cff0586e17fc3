"""The group state machine: revoke-before-assign, epochs, and a property test over random
joins, leaves, timeouts, confirmations and stream changes."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from flux_broker.groups.assignor import ASSIGNORS
from flux_broker.groups.state import (
    GroupState,
    complete,
    join,
    leave,
    new_group,
    rebalance,
)

PARTS = {"a": 4, "b": 2}


def _group(assignor: str = "least-loaded") -> GroupState:
    return new_group("g", assignor, "broker-1")


def test_first_member_gets_everything_at_once() -> None:
    state = join(_group(), "m1", ["a"], epoch=5, partitions=PARTS)
    assert state.epoch == 5
    assert state.assignment("m1") == {"a": (0, 1, 2, 3)}
    assert state.revoking("m1") == {}


def test_a_moving_partition_is_revoked_before_it_is_assigned() -> None:
    one = join(_group(), "m1", ["a"], epoch=1, partitions=PARTS)
    two = join(one, "m2", ["a"], epoch=2, partitions=PARTS)
    # m2 should read half, but m1 still owns them until it confirms.
    assert two.assignment("m1") == {"a": (0, 2)}
    assert two.revoking("m1") == {"a": (1, 3)}
    assert two.assignment("m2") == {}
    assert two.may_commit("m1", ("a", 1), 1)
    assert not two.may_commit("m2", ("a", 1), 2)
    # A partition that is not being revoked is not completed.
    assert complete(two, [("a", 0)], epoch=3, partitions=PARTS) is two
    three = complete(two, [("a", 1), ("a", 3)], epoch=3, partitions=PARTS)
    assert three.epoch == 3
    assert three.assignment("m2") == {"a": (1, 3)}
    assert three.owners["a", 1].since_epoch == 3
    assert not three.may_commit("m1", ("a", 1), 3)
    assert not three.may_commit("m2", ("a", 1), 2)  # an epoch before its ownership
    assert three.may_commit("m2", ("a", 1), 3)


def test_a_leaving_members_partitions_move_at_once() -> None:
    two = join(
        join(_group(), "m1", ["a"], epoch=1, partitions=PARTS),
        "m2",
        ["a"],
        epoch=2,
        partitions=PARTS,
    )
    settled = complete(two, list(two.owners), epoch=3, partitions=PARTS)
    gone = leave(settled, "m2", epoch=4, partitions=PARTS)
    assert gone.assignment("m1") == {"a": (0, 1, 2, 3)}
    assert gone.revoking("m1") == {}


def test_nothing_changed_keeps_the_epoch() -> None:
    one = join(_group(), "m1", ["a"], epoch=1, partitions=PARTS)
    assert join(one, "m1", ["a"], epoch=2, partitions=PARTS) is one
    assert rebalance(one, epoch=2, partitions=PARTS) is one


def test_a_deleted_stream_loses_its_partitions() -> None:
    one = join(_group(), "m1", ["a", "b"], epoch=1, partitions=PARTS)
    after = rebalance(one, epoch=2, partitions={"a": 4})
    assert after.assignment("m1") == {"a": (0, 1, 2, 3)}
    assert after.epoch == 2


@dataclass(frozen=True)
class _Op:
    kind: str
    consumer: str
    streams: tuple[str, ...] = ()


_consumers = st.sampled_from(["c1", "c2", "c3", "c4"])
_ops = st.one_of(
    st.builds(
        _Op,
        st.just("join"),
        _consumers,
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(tuple),
    ),
    st.builds(_Op, st.just("leave"), _consumers),
    st.builds(_Op, st.just("confirm"), _consumers),
    st.builds(_Op, st.just("timeout"), _consumers),
    st.builds(_Op, st.just("streams"), _consumers, st.just(("c",))),
)


def _covered(state: GroupState, partitions: dict[str, int]) -> set[tuple[str, int]]:
    read = {s for streams in state.members.values() for s in streams}
    return {(s, p) for s in read for p in range(partitions.get(s, 0))}


def _step(state: GroupState, op: _Op, epoch: int, partitions: dict[str, int]) -> GroupState:
    member = op.consumer in state.members
    if op.kind == "join":
        return join(state, op.consumer, op.streams, epoch=epoch, partitions=partitions)
    if op.kind == "leave" and member:
        return leave(state, op.consumer, epoch=epoch, partitions=partitions)
    if op.kind == "confirm" and member:
        mine = [k for k, own in state.owners.items() if own.owner == op.consumer and own.revoking]
        return complete(state, mine, epoch=epoch, partitions=partitions)
    if op.kind == "timeout":
        revoking = [k for k, own in state.owners.items() if own.revoking]
        return complete(state, revoking, epoch=epoch, partitions=partitions)
    if op.kind == "streams":
        # Stream "c" is created, or deleted again.
        if "c" in partitions:
            del partitions["c"]
        else:
            partitions["c"] = 2
        return rebalance(state, epoch=epoch, partitions=partitions)
    return state


@settings(max_examples=400, deadline=None)
@given(
    ops=st.lists(_ops, max_size=40),
    assignor=st.sampled_from(sorted(ASSIGNORS)),
)
def test_ownership_is_never_shared_and_always_covers(ops: list[_Op], assignor: str) -> None:
    partitions = {"a": 5, "b": 3}
    state = _group(assignor)
    epoch = 0
    for op in ops:
        epoch += 1
        before = state
        state = _step(state, op, epoch, partitions)
        # Epochs grow with every change, never otherwise.
        assert state.epoch == (before.epoch if state is before else epoch)
        # Every partition of a stream some member reads has exactly one owner, a member.
        assert set(state.owners) == _covered(state, partitions)
        for (stream, _), own in state.owners.items():
            assert own.owner in state.members
            assert own.since_epoch <= state.epoch
            if not own.revoking:
                assert stream in state.members[own.owner]
        # Assignments are disjoint, and none holds a partition another member still owns.
        seen: set[tuple[str, int]] = set()
        for consumer in state.members:
            mine = {(s, p) for s, ps in state.assignment(consumer).items() for p in ps}
            assert not mine & seen
            seen |= mine
            assert all(state.owners[key].owner == consumer for key in mine)
        # A partition changes hands between two members only through a finished revocation.
        for key, own in state.owners.items():
            was = before.owners.get(key)
            if was is not None and was.owner != own.owner and was.owner in state.members:
                assert was.revoking
                assert op.kind in {"confirm", "timeout"}
    # Once every revocation is finished, ownership is the assignor's target.
    epoch += 1
    settled = complete(state, list(state.owners), epoch=epoch, partitions=partitions)
    members = {c: frozenset(s) for c, s in settled.members.items()}
    target = ASSIGNORS[assignor].assign(members, partitions)
    assert {k: o.owner for k, o in settled.owners.items()} == target
