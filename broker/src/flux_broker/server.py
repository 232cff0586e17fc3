"""The broker process: NATS, metadata, streams and the gRPC API, started and stopped in order.

Start-up (:meth:`Broker.start`)::

    data dir lock ─▶ broker id ─▶ NATS (embedded child or --nats-servers) ─▶ metadata.db
             ─▶ recover every stream and partition ─▶ create __cursors if configured, load
             the cursors ─▶ create __activity if enabled, start its publisher ─▶ gRPC API +
             health SERVING ─▶ ready

Shutdown (:meth:`Broker.stop`, on SIGTERM or SIGINT), the reverse::

    health NOT_SERVING, stop accepting RPCs, end subscriptions (UNAVAILABLE, so clients
    resubscribe elsewhere) ─▶ in-flight RPCs finish within the grace period ─▶ the activity
    publisher stops (what it did not publish stays in the outbox) ─▶ leaders drain
    NATS and finish their appends and acks ─▶ logs closed ─▶ NATS closed ─▶ metadata closed

**Broker id.** ``clustering.server.id`` names the broker in metadata (leader, replicas, ISR).
When it is not configured, the broker generates one on the first start and keeps it in
``<data.dir>/broker-id``, so a restart serves the partitions it leads under the same id. A
configured id that differs from the stored one stops start-up: the data directory belongs to
another broker, and serving it under a new id would orphan every partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import nats
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client
from nats.nuid import NUID

from flux_broker import __version__
from flux_broker.activity import ActivityPublisher, ensure_activity_stream
from flux_broker.api.context import BrokerContext
from flux_broker.api.decoding import UndecodableRequests
from flux_broker.api.limits import Limits, LimitSettings
from flux_broker.api.service import ApiService
from flux_broker.api.slow_consumer import SlowConsumers
from flux_broker.clock import Clock, SystemClock
from flux_broker.config import Config
from flux_broker.cursors import CursorStore, ensure_cursors_stream
from flux_broker.data_dir import DataDirInUseError, DataDirLock
from flux_broker.groups.coordinator import GroupCoordinator, GroupTimeouts
from flux_broker.health import HealthServer
from flux_broker.metadata import SqliteMetadataStore
from flux_broker.metrics import BrokerMetrics
from flux_broker.nats.acks import AckRouter
from flux_broker.nats.connection import harden
from flux_broker.nats.embedded import EmbeddedNats, EmbeddedNatsError
from flux_broker.streams.effective_config import defaults as stream_defaults
from flux_broker.streams.manager import StreamManager
from flux_proto import api_pb2, api_pb2_grpc

__all__ = [
    "BROKER_ID_FILE",
    "METADATA_FILE",
    "SHUTDOWN_GRACE_S",
    "Broker",
    "BrokerSettings",
    "StartupError",
    "serve",
]

_logger = logging.getLogger(__name__)

#: File in the data directory holding a generated broker id.
BROKER_ID_FILE: Final = "broker-id"
#: The metadata database in the data directory.
METADATA_FILE: Final = "metadata.db"
#: How long in-flight RPCs (a Publish waiting for its ack) may take once shutdown begins.
SHUTDOWN_GRACE_S: Final = 5.0
#: Shortest interval between keepalive pings a client may send (on idle connections too).
CLIENT_PING_MIN_INTERVAL_MS: Final = 1_000
#: How often the broker pings each client connection, and how long it waits for the answer.
SERVER_PING_INTERVAL_MS: Final = 10_000
SERVER_PING_TIMEOUT_MS: Final = 5_000
_PORT_MAX: Final = 65535
#: Bound on connecting to NATS at start-up.
NATS_CONNECT_TIMEOUT_S: Final = 10.0
_API_SERVICE: Final = api_pb2.DESCRIPTOR.services_by_name["API"].full_name


class StartupError(Exception):
    """The broker cannot start; the message says why and what to do."""


def _slow_consumers(timeout_s: float) -> SlowConsumers:
    if timeout_s < 0:
        raise StartupError(
            f"subscriptions.slow.consumer.timeout must be 0 (off) or above, got {timeout_s:g}s"
        )
    return SlowConsumers(timeout_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSettings:
    """Everything the broker process needs, resolved from the config and the flags.

    Attributes:
        config: The merged configuration (file, environment, flags).
        data_dir: The data directory (absolute).
        embedded_nats: Run the embedded NATS server instead of connecting to ``nats.servers``.
        embedded_nats_port: Its client port (0 = any free port).
        ready_file: Where to write a JSON description of the running broker, or ``None``.
    """

    config: Config
    data_dir: Path
    embedded_nats: bool
    embedded_nats_port: int
    ready_file: Path | None = None


class Broker:
    """One broker process. Use :meth:`start`, then :meth:`stop` (or :meth:`run`)."""

    def __init__(self, settings: BrokerSettings, clock: Clock | None = None) -> None:
        """Describe the broker; nothing starts until :meth:`start`."""
        self.settings = settings
        self._config = settings.config
        self._clock: Clock = clock or SystemClock()
        self._lock: DataDirLock | None = None
        self._embedded: EmbeddedNats | None = None
        self._nc: Client | None = None
        self._store: SqliteMetadataStore | None = None
        self._streams: StreamManager | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._api: ApiService | None = None
        self._cursors: CursorStore | None = None
        self._groups: GroupCoordinator | None = None
        self._activity: ActivityPublisher | None = None
        #: This broker's metrics (scraped through the HTTP endpoint, if enabled).
        self.metrics = BrokerMetrics()
        self._http: HealthServer | None = None
        self._serving = False  # start-up finished
        self.broker_id = ""
        self.grpc_address = ""
        self.nats_url = ""
        self.advertised = ("", 0)
        self._stopped = asyncio.Event()
        #: Set when the broker stops because a component failed (exit status 1).
        self.failed = False

    # -- start-up ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every component; on failure, stop what started and raise.

        Raises:
            StartupError: A component could not start; the message says which and why.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        data_dir = self.settings.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = DataDirLock.acquire(data_dir)
        except DataDirInUseError as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(f"cannot use the data directory {data_dir}: {error}") from None
        self.broker_id = _broker_id(data_dir, self._config.string("clustering.server.id"))
        await self._start_http()
        await self._start_nats()
        self.metrics.watch(nc=self._nc)
        try:
            self._store = await SqliteMetadataStore.open(
                data_dir / METADATA_FILE,
                record_activity=self._config.boolean("activity.stream.enabled"),
            )
        except Exception as error:
            raise StartupError(f"cannot open the metadata database: {error}") from error
        await self._check_owner()
        self._keep_broker_id()
        assert self._nc is not None
        self._streams = StreamManager(
            data_dir=data_dir,
            store=self._store,
            nc=self._nc,
            broker_id=self.broker_id,
            namespace=self._config.string("clustering.namespace"),
            log_config=self._config.log_config(),
            batch_max_messages=self._config.integer("batch.max.messages"),
            clock=self._clock,
            auto_pause_time_s=self._config.seconds("streams.auto.pause.time"),
            auto_pause_disable_if_subscribers=self._config.boolean(
                "streams.auto.pause.disable.if.subscribers"
            ),
            metrics=self.metrics,
        )
        self.metrics.watch(streams=self._streams.streams)
        recovered = await self._streams.recover()
        _logger.info(
            "recovered %d partition(s) of %d stream(s)",
            recovered,
            len(list(self._streams.streams())),
        )
        self._cursors = await self._open_cursors()
        await self._start_activity()
        await self._start_groups()
        await self._start_grpc()
        for service in ("", _API_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        self._write_ready_file()

    async def _start_http(self) -> None:
        """Serve /metrics, /healthz and /readyz if ``metrics.port`` asks for it."""
        port = self._config.integer("metrics.port")
        if port < 0:
            return
        if port > _PORT_MAX:
            raise StartupError(f"metrics.port must be between -1 and {_PORT_MAX}, got {port}")
        listen = self._config.string("listen")
        host = listen.rsplit(":", 1)[0] if listen else self._config.string("host")
        self.metrics.watch(readiness=self.readiness)
        http = HealthServer(self.metrics, self.readiness)
        try:
            await http.start(host, port)
        except OSError as error:
            raise StartupError(
                f"cannot serve metrics on {host}:{port} (--metrics-port): {error}"
            ) from None
        self._http = http
        _logger.info(
            "metrics at http://%s/metrics, health checks at /healthz and /readyz", http.address
        )

    def readiness(self) -> str | None:
        """Why the broker is not ready to serve (``/readyz``), or ``None`` when it is."""
        if self._stopped.is_set():
            return "shutting down"
        if not self._serving:
            return "starting (recovering streams)"
        if self._nc is None or not self._nc.is_connected:
            return "NATS is disconnected"
        return None

    async def _start_groups(self) -> None:
        """Load the consumer groups and start their coordinator (a cluster of one leads all)."""
        assert self._streams is not None
        assert self._store is not None
        streams = self._streams
        try:
            timeouts = GroupTimeouts(
                consumer_s=self._config.seconds("groups.consumer.timeout"),
                coordinator_s=self._config.seconds("groups.coordinator.timeout"),
                revoke_s=self._config.seconds("groups.revoke.timeout"),
            )
        except ValueError as error:
            raise StartupError(str(error)) from None
        self._groups = GroupCoordinator(
            broker_id=self.broker_id,
            store=self._store,
            partition_counts=lambda: {
                live.metadata.name: len(live.partitions) for live in streams.streams()
            },
            notify_applied=streams.notify_applied,
            timeouts=timeouts,
        )
        await self._groups.load()
        self.metrics.watch(groups=self._groups)
        streams.on_applied(self._groups.on_applied)
        self._groups.start()

    async def _open_cursors(self) -> CursorStore:
        """Create ``__cursors`` if configured and missing, and load every cursor from it."""
        assert self._streams is not None
        try:
            partitions = await ensure_cursors_stream(
                self._streams,
                partitions=self._config.integer("cursors.stream.partitions"),
                replication_factor=self._config.integer("cursors.stream.replication.factor"),
                clock=self._clock,
            )
        except ValueError as error:
            raise StartupError(str(error)) from None
        cursors = CursorStore(self._streams, partitions)
        await cursors.load()
        return cursors

    async def _start_activity(self) -> None:
        """Create ``__activity`` if enabled and missing, and start publishing to it."""
        assert self._streams is not None
        assert self._store is not None
        try:
            enabled = await ensure_activity_stream(
                self._streams,
                enabled=self._config.boolean("activity.stream.enabled"),
                clock=self._clock,
            )
        except ValueError as error:
            raise StartupError(str(error)) from None
        if enabled:
            self._activity = ActivityPublisher(
                self._store,
                self._streams,
                append_timeout_s=self._config.seconds("activity.stream.publish.timeout"),
            )
            self._activity.start()

    async def _check_owner(self) -> None:
        """Refuse metadata whose partitions name only other brokers (a lost ``broker-id``)."""
        assert self._store is not None
        named = {
            broker_id
            for stream in await self._store.list_streams()
            for partition in stream.partitions
            for broker_id in (partition.leader, *partition.replicas)
        }
        if named and self.broker_id not in named:
            raise StartupError(
                f"the metadata in {self.settings.data_dir} names broker(s) "
                f"{', '.join(sorted(named))}, not this broker ({self.broker_id!r}): start with "
                f"--server-id {sorted(named)[0]} (the {BROKER_ID_FILE} file may have been lost)"
            )

    def _keep_broker_id(self) -> None:
        """Write the broker id to ``broker-id`` once the metadata agreed with it."""
        path = self.settings.data_dir / BROKER_ID_FILE
        try:
            stored = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            stored = ""
        if stored != self.broker_id:
            _write_durably(path, self.broker_id + "\n")

    async def _start_nats(self) -> None:
        config = self._config
        if self.settings.embedded_nats:
            self._embedded = await EmbeddedNats.start(
                port=self.settings.embedded_nats_port,
                data_dir=self.settings.data_dir,
                log=logging.getLogger("flux_broker.nats.embedded"),
            )
            self._embedded.done.add_done_callback(self._on_embedded_exit)
            servers = [self._embedded.url]
        else:
            servers = config.strings("nats.servers")
        options: dict[str, object] = {
            "servers": servers,
            "name": f"flux-broker {self.broker_id}",
            "connect_timeout": 2,
            # Start-up tries each server twice and fails with the reason (a refused password
            # must not hang); once connected, the broker reconnects for as long as it runs.
            "max_reconnect_attempts": 1,
            "error_cb": _on_nats_error,
            "disconnected_cb": self._on_nats_disconnected,
            "reconnected_cb": _on_nats_reconnected,
        }
        if config.string("nats.user"):
            options["user"] = config.string("nats.user")
            options["password"] = config.string("nats.password")
        tls = _nats_tls(config)
        if tls is not None:
            options["tls"] = tls
        try:
            async with asyncio.timeout(NATS_CONNECT_TIMEOUT_S):
                self._nc = await nats.connect(allow_reconnect=True, **options)  # type: ignore[arg-type]
        except (TimeoutError, OSError, nats.errors.Error) as error:
            reason = str(error) or type(error).__name__
            where = ", ".join(servers)
            raise StartupError(f"cannot connect to NATS at {where}: {reason}") from None
        self._nc.options["max_reconnect_attempts"] = -1
        harden(self._nc)
        self.nats_url = self._nc.connected_url.geturl() if self._nc.connected_url else servers[0]

    async def _on_nats_disconnected(self) -> None:
        if not self._stopped.is_set():
            _logger.warning("NATS: disconnected; reconnecting")

    def _on_embedded_exit(self, done: asyncio.Future[int]) -> None:
        if not self._stopped.is_set() and self._streams is not None:
            _logger.error("the embedded NATS server exited; shutting the broker down")
            self.failed = True
            self.request_stop()

    async def _start_grpc(self) -> None:
        config = self._config
        assert self._streams is not None
        assert self._nc is not None
        host = config.string("host")
        port = config.integer("port")
        listen = config.string("listen") or f"{host}:{port}"
        try:
            limits = LimitSettings.from_config(config)
        except ValueError as error:
            raise StartupError(str(error)) from None
        server = grpc.aio.server(
            # Requests that are not their method's message: INVALID_ARGUMENT, no traceback.
            interceptors=[UndecodableRequests()],
            options=[
                # Larger requests get RESOURCE_EXHAUSTED from gRPC before any handler runs.
                ("grpc.max_receive_message_length", limits.grpc_receive_max_bytes),
                ("grpc.so_reuseport", 0),
                # Clients ping to notice dead connections (flux_client: every 10 s by default,
                # idle or not). gRPC's server default answers pings more often than every
                # 5 minutes without data with GOAWAY, cutting idle subscriptions; accept
                # them down to CLIENT_PING_MIN_INTERVAL_MS.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MIN_INTERVAL_MS),
                ("grpc.http2.max_ping_strikes", 0),
                # The broker pings its clients too, so a connection that went silent (a
                # consumer whose host vanished) ends: an open WatchConsumerGroupAssignments is
                # a member's heartbeat only while its connection answers.
                ("grpc.keepalive_time_ms", SERVER_PING_INTERVAL_MS),
                ("grpc.keepalive_timeout_ms", SERVER_PING_TIMEOUT_MS),
            ],
        )
        self._server = server
        try:
            bound = server.add_insecure_port(listen)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {listen}: {error}") from None
        if bound == 0:
            raise StartupError(f"cannot listen on {listen}: the address is taken or invalid")
        advertised_port = port or bound
        self.grpc_address = f"{listen.rsplit(':', 1)[0]}:{bound}"
        self.advertised = (host, advertised_port)
        broker = BrokerContext(
            broker_id=self.broker_id,
            host=host,
            port=advertised_port,
            namespace=config.string("clustering.namespace"),
            record_max_bytes=config.integer("clustering.replication.max.bytes"),
            streams=self._streams,
            nc=self._nc,
            acks=AckRouter(self._nc, config.string("clustering.namespace")),
            stream_defaults=stream_defaults(config),
            clock=self._clock,
            cursors=self._cursors,
            groups=self._groups,
            metrics=self.metrics,
            limits=Limits(limits),
            slow_consumers=_slow_consumers(config.seconds("subscriptions.slow.consumer.timeout")),
        )
        self._api = ApiService(broker)
        api_pb2_grpc.add_APIServicer_to_server(self._api, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await server.start()

    def _write_ready_file(self) -> None:
        path = self.settings.ready_file
        if path is None:
            return
        info = {
            "pid": os.getpid(),
            "broker_id": self.broker_id,
            "grpc": self.grpc_address,
            "advertised": f"{self.advertised[0]}:{self.advertised[1]}",
            "nats": self.nats_url,
            "data_dir": str(self.settings.data_dir),
        }
        if self._http is not None:
            info["metrics"] = self._http.address
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(info) + "\n", encoding="utf-8")
        temporary.replace(path)

    def describe(self) -> str:
        """The start-up summary printed once the broker serves."""
        config = self._config
        nats_kind = "embedded" if self.settings.embedded_nats else "external"
        return (
            f"flux-broker {__version__} ready\n"
            f"  broker id    {self.broker_id}\n"
            f"  gRPC         {self.grpc_address} (advertised as "
            f"{self.advertised[0]}:{self.advertised[1]})\n"
            f"  NATS         {self.nats_url} ({nats_kind})\n"
            f"  data dir     {self.settings.data_dir}\n"
            f"  sync policy  {config.string('streams.sync.policy')}\n"
        ) + (f"  metrics      http://{self._http.address}/metrics\n" if self._http else "")

    # -- running and stopping --------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (signal handlers call this)."""
        self._stopped.set()

    async def wait_stop_requested(self) -> None:
        """Wait until :meth:`request_stop` is called."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Shut down in order (see the module docstring); idempotent, never raises."""
        self._stopped.set()
        if self._server is not None:
            for service in ("", _API_SERVICE):
                await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self._api is not None:
                self._api.begin_shutdown()
            await self._server.stop(SHUTDOWN_GRACE_S)
            self._server = None
        if self._groups is not None:
            await _logged("stopping the group coordinator", self._groups.close())
            self._groups = None
        if self._activity is not None:
            await _logged("stopping the activity publisher", self._activity.close())
            self._activity = None
        if self._streams is not None:
            await _logged("closing the streams", self._streams.close())
            self._streams = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
        if self._embedded is not None:
            await _logged("stopping the embedded NATS server", self._embedded.stop())
            self._embedded = None
        if self._store is not None:
            await _logged("closing the metadata database", self._store.close())
            self._store = None
        path = self.settings.ready_file
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


async def _logged(what: str, step: object) -> None:
    assert asyncio.iscoroutine(step)
    try:
        await step
    except Exception:
        _logger.exception("shutdown: %s failed", what)


def _broker_id(data_dir: Path, configured: str) -> str:
    path = data_dir / BROKER_ID_FILE
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored = ""
    except OSError as error:
        raise StartupError(f"cannot read {path}: {error}") from None
    if stored and configured and stored != configured:
        raise StartupError(
            f"the data directory {data_dir} belongs to broker {stored!r}, not {configured!r}: "
            f"start with --server-id {stored} or use another --data-dir"
        )
    return configured or stored or NUID().next().decode()


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temporary file, fsync, rename, fsync the directory."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nats_tls(config: Config) -> ssl.SSLContext | None:
    ca, cert, key = (config.string(f"nats.tls.{name}") for name in ("ca", "cert", "key"))
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise StartupError("nats.tls.cert and nats.tls.key must be set together")
    try:
        context = ssl.create_default_context(cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"cannot load the NATS TLS files: {error}") from None
    return context


async def _on_nats_error(error: Exception) -> None:
    _logger.warning("NATS: %s", error)


async def _on_nats_reconnected() -> None:
    _logger.info("NATS: reconnected")


async def serve(settings: BrokerSettings) -> int:
    """Run a broker until SIGTERM or SIGINT, printing the start-up summary; return the exit status.

    Returns:
        0 after a graceful shutdown; 1 when start-up failed (the reason is logged) or the
        embedded NATS server died.
    """
    broker = Broker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, broker.request_stop)
    try:
        try:
            await broker.start()
        except (StartupError, EmbeddedNatsError) as error:
            _logger.error("cannot start: %s", error)
            return 1
        sys.stdout.write(broker.describe())
        sys.stdout.flush()
        await broker.wait_stop_requested()
        _logger.info("shutting down")
        await broker.stop()
        _logger.info("stopped")
        return 1 if broker.failed else 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
