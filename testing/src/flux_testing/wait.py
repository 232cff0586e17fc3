"""Bounded waits for a condition: the only way Flux tests wait.

A test that needs something to happen polls a predicate until it holds or a deadline passes;
it never sleeps for a fixed time hoping the thing has happened. The polling interval is short
and only paces the checks; the deadline is what bounds the test.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

__all__ = ["WaitTimeoutError", "wait_for", "wait_for_sync"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.01


class WaitTimeoutError(AssertionError):
    """The condition did not hold before the deadline.

    An ``AssertionError`` so that pytest reports it as a test failure, not an error in setup.
    """


def _describe(predicate: Callable[[], object], message: str | None) -> str:
    return message or str(getattr(predicate, "__qualname__", repr(predicate)))


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    timeout_s: float = ...,
    *,
    interval_s: float = ...,
    message: str | None = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T | None],
    timeout_s: float = ...,
    *,
    interval_s: float = ...,
    message: str | None = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], object],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    message: str | None = None,
) -> object:
    """Await until ``predicate()`` returns a truthy value, and return that value.

    Args:
        predicate: A function, sync or async, checked until it returns something truthy.
            Exceptions it raises propagate at once.
        timeout_s: Deadline in seconds from the call.
        interval_s: Pause between checks.
        message: What was awaited, for the failure message.

    Returns:
        The first truthy value the predicate returned.

    Raises:
        WaitTimeoutError: The predicate stayed falsy for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(
                f"timed out after {timeout_s:g}s waiting for {_describe(predicate, message)}"
            )
        await asyncio.sleep(interval_s)


def wait_for_sync(
    predicate: Callable[[], T | None],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    message: str | None = None,
) -> T:
    """Block until ``predicate()`` returns a truthy value; the synchronous :func:`wait_for`.

    Raises:
        WaitTimeoutError: The predicate stayed falsy for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(
                f"timed out after {timeout_s:g}s waiting for {_describe(predicate, message)}"
            )
        time.sleep(interval_s)
