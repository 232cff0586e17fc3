"""Tests of flux_client._retry (RetryPolicy, Backoff) and flux_client._partitioner."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_client._partitioner import KeyHashPartitioner, Partitioner, RoundRobinPartitioner
from flux_client._retry import Backoff, RetryPolicy


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 -- reproducible jitter, not secrets


# -- RetryPolicy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_backoff_ms": -1.0},
        {"initial_backoff_ms": 100.0, "max_backoff_ms": 99.0},
        {"multiplier": 0.99},
        {"multiplier": 0.0},
        {"jitter": -0.01},
        {"jitter": 1.01},
        {"max_attempts": 0},
        {"max_attempts": -3},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"initial_backoff_ms": 0.0, "max_backoff_ms": 0.0},
        {"initial_backoff_ms": 5.0, "max_backoff_ms": 5.0},
        {"multiplier": 1.0},
        {"jitter": 0.0},
        {"jitter": 1.0},
        {"max_attempts": 1},
    ],
)
def test_edge_policies_are_accepted(kwargs: dict[str, float]) -> None:
    RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]


def test_without_jitter_the_waits_double_up_to_the_maximum() -> None:
    policy = RetryPolicy(
        initial_backoff_ms=50, max_backoff_ms=1_000, multiplier=2, jitter=0, max_attempts=9
    )
    assert list(policy.backoffs_s()) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_there_are_max_attempts_minus_one_waits() -> None:
    for attempts in (1, 2, 5, 20):
        assert len(list(RetryPolicy(max_attempts=attempts).backoffs_s())) == attempts - 1


def test_the_waits_are_lazy() -> None:
    policy = RetryPolicy(max_attempts=1_000_000, jitter=0)
    assert list(itertools.islice(policy.backoffs_s(), 3)) == pytest.approx([0.05, 0.1, 0.2])


def test_a_seeded_random_gives_the_same_waits() -> None:
    policy = RetryPolicy(jitter=0.5, max_attempts=10)
    first = list(policy.backoffs_s(seeded(7)))
    assert first == list(policy.backoffs_s(seeded(7)))
    assert first != list(policy.backoffs_s(seeded(8)))


def test_jitter_spreads_the_waits() -> None:
    policy = RetryPolicy(initial_backoff_ms=100, max_backoff_ms=100, jitter=0.2, max_attempts=200)
    waits = list(policy.backoffs_s(seeded(1)))
    assert len(set(waits)) > 100
    assert min(waits) < 0.09
    assert max(waits) > 0.11


@given(
    initial=st.floats(0, 5_000),
    extra=st.floats(0, 60_000),
    multiplier=st.floats(1, 10),
    jitter=st.floats(0, 1),
    attempts=st.integers(1, 40),
    seed=st.integers(0, 2**32),
)
def test_waits_are_bounded_and_grow_within_the_jitter(
    *, initial: float, extra: float, multiplier: float, jitter: float, attempts: int, seed: int
) -> None:
    policy = RetryPolicy(
        initial_backoff_ms=initial,
        max_backoff_ms=initial + extra,
        multiplier=multiplier,
        jitter=jitter,
        max_attempts=attempts,
    )
    waits = list(policy.backoffs_s(seeded(seed)))
    assert len(waits) == attempts - 1
    nominal_ms = initial
    for wait in waits:
        assert wait >= 0
        low = max(0.0, nominal_ms * (1 - jitter)) / 1000
        high = nominal_ms * (1 + jitter) / 1000
        assert low - 1e-9 <= wait <= high + 1e-9
        assert wait <= policy.max_backoff_ms * (1 + jitter) / 1000 + 1e-9
        nominal_ms = min(policy.max_backoff_ms, nominal_ms * multiplier)


# -- Backoff ---------------------------------------------------------------------------------


def test_backoff_is_exhausted_after_the_policy_waits_then_waits_the_maximum() -> None:
    policy = RetryPolicy(
        initial_backoff_ms=10, max_backoff_ms=1_000, multiplier=2, jitter=0, max_attempts=4
    )
    backoff = Backoff(policy)
    assert (backoff.attempts, backoff.exhausted) == (0, False)
    assert backoff.next_s() == pytest.approx(0.01)
    assert backoff.next_s() == pytest.approx(0.02)
    assert (backoff.attempts, backoff.exhausted) == (2, False)
    assert backoff.next_s() == pytest.approx(0.04)
    assert (backoff.attempts, backoff.exhausted) == (3, True)
    # It never runs out: further waits are the maximum.
    for attempts in range(4, 9):
        assert backoff.next_s() == pytest.approx(1.0)
        assert (backoff.attempts, backoff.exhausted) == (attempts, True)


def test_backoff_reset_starts_over() -> None:
    policy = RetryPolicy(
        initial_backoff_ms=10, max_backoff_ms=1_000, multiplier=3, jitter=0, max_attempts=3
    )
    backoff = Backoff(policy)
    backoff.next_s()
    backoff.next_s()
    assert (backoff.attempts, backoff.exhausted) == (2, True)
    backoff.reset()
    assert (backoff.attempts, backoff.exhausted) == (0, False)
    assert backoff.next_s() == pytest.approx(0.01)
    assert backoff.next_s() == pytest.approx(0.03)


def test_backoff_reset_before_any_wait_changes_nothing() -> None:
    backoff = Backoff(RetryPolicy(jitter=0))
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_s() == pytest.approx(0.05)


def test_a_single_attempt_policy_is_exhausted_at_once() -> None:
    backoff = Backoff(RetryPolicy(max_attempts=1, max_backoff_ms=300))
    assert backoff.exhausted
    assert backoff.next_s() == pytest.approx(0.3)


def test_backoff_with_a_seeded_random_is_reproducible() -> None:
    policy = RetryPolicy(jitter=0.3, max_attempts=6)
    one = Backoff(policy, seeded(3))
    two = Backoff(policy, seeded(3))
    assert [one.next_s() for _ in range(8)] == [two.next_s() for _ in range(8)]
    assert [one.next_s() for _ in range(2)] == pytest.approx([2.0, 2.0])


# -- partitioners ----------------------------------------------------------------------------

#: IEEE CRC-32 of a few keys, written out (the Go client's partitioner uses the same sum).
KNOWN_CRC32 = {
    b"": 0,
    b"a": 0xE8B7BE43,
    b"123456789": 0xCBF43926,
    b"hello": 0x3610A686,
    b"The quick brown fox jumps over the lazy dog": 0x414FA339,
}


@pytest.mark.parametrize(("key", "crc"), KNOWN_CRC32.items())
@pytest.mark.parametrize("count", [1, 2, 3, 7, 16, 1000])
def test_key_hash_is_the_crc32_of_the_key_modulo_the_count(
    key: bytes, crc: int, count: int
) -> None:
    assert zlib.crc32(key) == crc
    partitioner = KeyHashPartitioner()
    assert partitioner.partition("s", key, count) == crc % count
    # The same key always goes to the same partition, whatever came in between.
    partitioner.partition("s", None, count)
    partitioner.partition("s", b"other", count)
    assert partitioner.partition("s", key, count) == crc % count
    assert partitioner.partition("t", key, count) == crc % count


def test_the_empty_key_goes_to_partition_zero() -> None:
    partitioner = KeyHashPartitioner()
    assert [partitioner.partition("s", b"", count) for count in (1, 2, 5, 9)] == [0, 0, 0, 0]


@given(key=st.binary(max_size=64), count=st.integers(1, 10_000))
def test_key_hash_property(key: bytes, count: int) -> None:
    choice = KeyHashPartitioner().partition("s", key, count)
    assert choice == zlib.crc32(key) % count
    assert 0 <= choice < count


def test_key_hash_without_a_key_is_round_robin_per_stream() -> None:
    partitioner = KeyHashPartitioner()
    assert [partitioner.partition("a", None, 3) for _ in range(4)] == [0, 1, 2, 0]
    # Another stream has its own turn; keyed records do not advance it.
    assert partitioner.partition("b", None, 3) == 0
    partitioner.partition("a", b"k", 3)
    assert partitioner.partition("a", None, 3) == 1
    assert partitioner.partition("b", None, 3) == 1


def test_round_robin_cycles_per_stream() -> None:
    partitioner = RoundRobinPartitioner()
    assert [partitioner.partition("a", b"ignored", 4) for _ in range(9)] == [
        0, 1, 2, 3, 0, 1, 2, 3, 0
    ]  # fmt: skip
    assert [partitioner.partition("b", None, 2) for _ in range(3)] == [0, 1, 0]
    assert partitioner.partition("a", None, 4) == 1


def test_round_robin_stays_in_range_when_the_count_changes() -> None:
    partitioner = RoundRobinPartitioner()
    for count in (5, 5, 5, 2, 1, 3, 1):
        assert 0 <= partitioner.partition("s", None, count) < count


def test_both_partitioners_are_partitioners() -> None:
    partitioners: list[Partitioner] = [KeyHashPartitioner(), RoundRobinPartitioner()]
    for partitioner in partitioners:
        assert partitioner.partition("s", b"k", 1) == 0
