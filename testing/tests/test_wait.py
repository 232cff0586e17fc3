"""wait_for returns as soon as the condition holds and fails clearly when it never does."""

from __future__ import annotations

import time

import pytest

from flux_testing import WaitTimeoutError, wait_for, wait_for_sync


async def test_wait_for_returns_the_first_truthy_value() -> None:
    calls: list[int] = []

    def third_time_lucky() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert await wait_for(third_time_lucky, 5, interval_s=0) == 3


async def test_wait_for_accepts_async_predicates() -> None:
    async def ready() -> str:
        return "ready"

    assert await wait_for(ready, 1) == "ready"


async def test_wait_for_times_out_with_the_message() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError, match="the moon to turn blue"):
        await wait_for(lambda: False, 0.05, message="the moon to turn blue")
    assert time.monotonic() - started < 2


def test_wait_for_sync_times_out_and_propagates_errors() -> None:
    with pytest.raises(WaitTimeoutError, match=r"timed out after 0\.05s"):
        wait_for_sync(lambda: None, 0.05)

    def broken() -> bool:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        wait_for_sync(broken, 1)
