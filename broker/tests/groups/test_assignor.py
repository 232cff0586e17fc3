"""Assignors: the documented rules, determinism, and coverage of every subscribed partition."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flux_broker.groups.assignor import (
    ASSIGNORS,
    LeastLoadedAssignor,
    RangeAssignor,
    RoundRobinAssignor,
)

STREAMS = ("a", "b", "c")


def test_least_loaded_is_liftbridges_rule() -> None:
    # Streams in name order; each partition to the member with the fewest so far, ties by id.
    members = {"m2": frozenset({"a", "b"}), "m1": frozenset({"a"})}
    assignment = LeastLoadedAssignor().assign(members, {"a": 3, "b": 2})
    assert assignment == {
        ("a", 0): "m1",
        ("a", 1): "m2",
        ("a", 2): "m1",
        ("b", 0): "m2",
        ("b", 1): "m2",
    }


def test_range_gives_contiguous_runs_and_the_extra_ones_first() -> None:
    members = {"x": frozenset({"a"}), "y": frozenset({"a"}), "z": frozenset({"a"})}
    assignment = RangeAssignor().assign(members, {"a": 7})
    assert [assignment["a", p] for p in range(7)] == ["x", "x", "x", "y", "y", "z", "z"]


def test_round_robin_deals_in_turn_and_skips_members_not_reading_a_stream() -> None:
    members = {"x": frozenset({"a", "b"}), "y": frozenset({"a"})}
    assignment = RoundRobinAssignor().assign(members, {"a": 3, "b": 2})
    assert [assignment["a", p] for p in range(3)] == ["x", "y", "x"]
    assert [assignment["b", p] for p in range(2)] == ["x", "x"]


def test_streams_without_partitions_or_readers_get_nothing() -> None:
    members = {"x": frozenset({"missing"})}
    for assignor in ASSIGNORS.values():
        assert assignor.assign(members, {"other": 4}) == {}


_members = st.dictionaries(
    st.text(alphabet="abcdef", min_size=1, max_size=3),
    st.frozensets(st.sampled_from(STREAMS), min_size=1),
    max_size=6,
)
_partitions = st.fixed_dictionaries({s: st.integers(0, 9) for s in STREAMS})


@settings(max_examples=300, deadline=None)
@given(members=_members, partitions=_partitions, name=st.sampled_from(sorted(ASSIGNORS)))
def test_every_subscribed_partition_gets_one_subscribed_member(
    members: dict[str, frozenset[str]], partitions: dict[str, int], name: str
) -> None:
    assignor = ASSIGNORS[name]
    assignment = assignor.assign(members, partitions)
    read = {s for streams in members.values() for s in streams}
    expected = {(s, p) for s in read for p in range(partitions[s])}
    assert set(assignment) == expected
    for (stream, _), consumer in assignment.items():
        assert stream in members[consumer]
    # The same inputs, in any order, give the same assignment.
    reordered = dict(reversed(list(members.items())))
    assert assignor.assign(reordered, partitions) == assignment


@settings(max_examples=200, deadline=None)
@given(members=_members, partitions=_partitions)
def test_least_loaded_and_range_balance_a_single_stream(
    members: dict[str, frozenset[str]], partitions: dict[str, int]
) -> None:
    readers = {c: frozenset({"a"}) for c in members}
    for assignor in (LeastLoadedAssignor(), RangeAssignor(), RoundRobinAssignor()):
        counts = dict.fromkeys(readers, 0)
        for consumer in assignor.assign(readers, partitions).values():
            counts[consumer] += 1
        if counts:
            assert max(counts.values()) - min(counts.values()) <= 1
