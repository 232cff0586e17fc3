"""Broker configuration: Liftbridge's dotted keys, from a YAML file, the environment and flags.

Sources, lowest precedence first: the defaults below, the YAML file (``--config``), environment
variables ``FLUX_<KEY>`` (dots become underscores, upper case: ``FLUX_STREAMS_SEGMENT_MAX_BYTES``),
then command-line flags.

The file uses Liftbridge's full key names, written flat (``streams.segment.max.bytes: 1024``)
or nested (``streams: {segment: {max: {bytes: 1024}}}``), and durations in Go syntax (``500ms``,
``5m``, ``1h30m``), so a real Liftbridge config file loads. Every key is in :data:`KEYS` with its
type, default and support:

- ``SUPPORTED``: honoured.
- ``IGNORED``: a Liftbridge feature Flux does not have (yet); accepted with a warning naming it.
- ``FAIL_CLOSED``: a security feature Flux does not have yet (``tls.*``, stream encryption):
  setting it stops start-up, because serving plaintext when TLS was asked for is worse than not
  starting.

An unknown key in the file stops start-up, naming the key (a typo must not silently become a
default).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from flux_broker.duration import DurationError, parse_duration
from flux_broker.log.config import LogConfig, SyncPolicy

__all__ = ["KEYS", "Config", "ConfigError", "ConfigKey", "Kind", "Support", "load_config"]

ENV_PREFIX: Final = "FLUX_"
MIB: Final = 1024 * 1024
_log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and where it came from."""


class Kind(enum.Enum):
    """How a key's value is written and parsed."""

    STRING = "string"
    INT = "integer"
    BOOL = "boolean"
    DURATION = "duration"  # Go syntax; parsed to seconds
    STRINGS = "list of strings"


class Support(enum.Enum):
    """What Flux does with a key (see the module docstring)."""

    SUPPORTED = "supported"
    IGNORED = "ignored"
    FAIL_CLOSED = "fail-closed"


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """One configuration key."""

    name: str
    kind: Kind
    default: object
    support: Support = Support.SUPPORTED
    choices: tuple[str, ...] = ()


def _k(
    name: str,
    kind: Kind,
    default: object,
    support: Support = Support.SUPPORTED,
    choices: tuple[str, ...] = (),
) -> ConfigKey:
    return ConfigKey(name, kind, default, support, choices)


S, N, B, D, L = Kind.STRING, Kind.INT, Kind.BOOL, Kind.DURATION, Kind.STRINGS
IGNORED, FAIL_CLOSED = Support.IGNORED, Support.FAIL_CLOSED
WEEK_S: Final = 7 * 24 * 3600.0

#: Every key Flux knows: Liftbridge's (facts: liftbridge-server.md §5) and Flux's own.
KEYS: Final[dict[str, ConfigKey]] = {
    key.name: key
    for key in (
        # Server.
        _k("listen", S, ""),
        _k("host", S, "localhost"),
        _k("port", N, 9292),
        _k("data.dir", S, ""),
        _k("logging.level", S, "info", choices=("debug", "info", "warn", "error")),
        _k("logging.format", S, "text", choices=("text", "json")),  # Flux's own
        # Flux's own: HTTP port of /metrics, /healthz, /readyz (-1 = off, 0 = any free port).
        _k("metrics.port", N, -1),
        _k("logging.recovery", B, False, IGNORED),
        _k("logging.raft", B, False, IGNORED),
        _k("logging.nats", B, False, IGNORED),
        _k("batch.max.messages", N, 1024),
        _k("batch.max.time", D, 0.0),
        _k("metadata.cache.max.age", D, 120.0, IGNORED),
        _k("telemetry.enabled", B, False, IGNORED),  # Flux never phones home
        _k("telemetry.interval.seconds", N, 86400, IGNORED),
        # Security: not available yet, so asking for it must not start a plaintext broker.
        _k("tls.key", S, "", FAIL_CLOSED),
        _k("tls.cert", S, "", FAIL_CLOSED),
        _k("tls.client.auth.enabled", B, False, FAIL_CLOSED),
        _k("tls.client.auth.ca", S, "", FAIL_CLOSED),
        _k("tls.client.authz.enabled", B, False, FAIL_CLOSED),
        _k("tls.client.authz.model", S, "", FAIL_CLOSED),
        _k("tls.client.authz.policy", S, "", FAIL_CLOSED),
        # NATS connection.
        _k("nats.servers", L, []),
        _k("nats.user", S, ""),
        _k("nats.password", S, ""),
        _k("nats.tls.cert", S, ""),
        _k("nats.tls.key", S, ""),
        _k("nats.tls.ca", S, ""),
        _k("nats.embedded", B, False),
        _k("nats.embedded.config", S, "", IGNORED),
        # Streams: server-wide defaults, overridable per stream.
        _k("streams.retention.max.bytes", N, 0),
        _k("streams.retention.max.messages", N, 0),
        _k("streams.retention.max.age", D, WEEK_S),
        _k("streams.cleaner.interval", D, 300.0),
        _k("streams.segment.max.bytes", N, 256 * MIB),
        _k("streams.segment.max.age", D, WEEK_S),
        _k("streams.compact.enabled", B, False),
        _k("streams.compact.max.goroutines", N, 10, IGNORED),
        _k("streams.auto.pause.time", D, 0.0),
        _k("streams.auto.pause.disable.if.subscribers", B, False),
        _k("streams.concurrency.control", B, False, IGNORED),
        _k("streams.encryption", B, False, FAIL_CLOSED),
        # Streams: Flux's own.
        _k("streams.sync.policy", S, "always", choices=tuple(p.value for p in SyncPolicy)),
        _k("streams.sync.interval", D, 1.0),
        _k("streams.batch.max.bytes", N, 8 * MIB),
        _k("streams.compact.tombstone.retention", D, 24 * 3600.0),
        _k("streams.compact.max.keys", N, 1_000_000),
        # Limits: Flux's own (flux_broker.api.limits says why each default is what it is).
        _k("limits.streams.max.count", N, 10_000),
        _k("limits.stream.partitions.max.count", N, 1024),
        _k("limits.message.headers.max.count", N, 1024),
        _k("limits.message.headers.max.bytes", N, 64 * 1024),
        _k("limits.connection.subscriptions.max.count", N, 1000),
        _k("limits.grpc.receive.max.bytes", N, 16 * MIB),
        # Subscriptions: Flux's own (flux_broker.api.slow_consumer says why 30s).
        _k("subscriptions.slow.consumer.timeout", D, 30.0),
        # Clustering.
        _k("clustering.server.id", S, ""),
        _k("clustering.namespace", S, "liftbridge-default"),
        _k("clustering.raft.snapshot.retain", N, 2, IGNORED),
        _k("clustering.raft.snapshot.threshold", N, 8192, IGNORED),
        _k("clustering.raft.cache.size", N, 512, IGNORED),
        _k("clustering.raft.bootstrap.seed", B, False, IGNORED),
        _k("clustering.raft.bootstrap.peers", L, [], IGNORED),
        _k("clustering.raft.max.quorum.size", N, 0, IGNORED),
        _k("clustering.replica.max.lag.time", D, 15.0, IGNORED),
        _k("clustering.replica.max.leader.timeout", D, 15.0, IGNORED),
        _k("clustering.replica.max.idle.wait", D, 10.0, IGNORED),
        _k("clustering.replica.fetch.timeout", D, 3.0, IGNORED),
        _k("clustering.min.insync.replicas", N, 1, IGNORED),
        _k("clustering.replication.max.bytes", N, 1 * MIB),
        # Activity stream, cursors, consumer groups.
        _k("activity.stream.enabled", B, False),
        _k("activity.stream.publish.timeout", D, 5.0),
        # Every policy means "in the leader's log" on a cluster of one (flux_broker.activity).
        _k("activity.stream.publish.ack.policy", S, "all", choices=("none", "leader", "all")),
        _k("cursors.stream.partitions", N, 1),  # Liftbridge: 0; see DESIGN.md §4.5
        _k("cursors.stream.replication.factor", N, -1),
        _k("cursors.stream.auto.pause.time", D, 60.0, IGNORED),
        _k("groups.consumer.timeout", D, 15.0),
        _k("groups.coordinator.timeout", D, 15.0),
        # Flux: how long a member has to confirm a revocation (revoke-before-assign).
        _k("groups.revoke.timeout", D, 15.0),
    )
}


@dataclass(frozen=True, slots=True)
class Config:
    """The merged configuration: a value for every key, and where each value came from."""

    values: Mapping[str, object]
    sources: Mapping[str, str]  # key -> "default" | "file" | "environment" | "flag"

    def string(self, name: str) -> str:
        """The value of a string key."""
        value = self.values[name]
        assert isinstance(value, str), name
        return value

    def integer(self, name: str) -> int:
        """The value of an integer key."""
        value = self.values[name]
        assert isinstance(value, int), name
        return value

    def boolean(self, name: str) -> bool:
        """The value of a boolean key."""
        value = self.values[name]
        assert isinstance(value, bool), name
        return value

    def seconds(self, name: str) -> float:
        """The value of a duration key, in seconds."""
        value = self.values[name]
        assert isinstance(value, float), name
        return value

    def strings(self, name: str) -> list[str]:
        """The value of a list key."""
        value = self.values[name]
        assert isinstance(value, list), name
        return [str(item) for item in value]

    def log_config(self) -> LogConfig:
        """The commit-log settings (``streams.*``) as a :class:`LogConfig`."""
        return LogConfig(
            segment_max_bytes=self.integer("streams.segment.max.bytes"),
            segment_max_age_s=self.seconds("streams.segment.max.age"),
            sync_policy=SyncPolicy(self.string("streams.sync.policy")),
            sync_interval_s=self.seconds("streams.sync.interval"),
            record_max_bytes=self.integer("clustering.replication.max.bytes"),
            batch_max_bytes=self.integer("streams.batch.max.bytes"),
            retention_max_bytes=self.integer("streams.retention.max.bytes"),
            retention_max_messages=self.integer("streams.retention.max.messages"),
            retention_max_age_s=self.seconds("streams.retention.max.age"),
            cleaner_interval_s=self.seconds("streams.cleaner.interval"),
            compact_enabled=self.boolean("streams.compact.enabled"),
            compact_tombstone_retention_s=self.seconds("streams.compact.tombstone.retention"),
            compact_max_keys=self.integer("streams.compact.max.keys"),
        )


def env_name(key: str) -> str:
    """The environment variable that overrides ``key`` (``FLUX_STREAMS_SEGMENT_MAX_BYTES``)."""
    return ENV_PREFIX + key.upper().replace(".", "_")


_ENV_KEYS: Final = {env_name(name): name for name in KEYS}


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Config:
    """Merge defaults, the YAML file, ``FLUX_*`` environment variables and flags.

    Args:
        path: The YAML file, or ``None`` for none.
        environ: The environment (``os.environ`` when ``None``).
        flags: Values from the command line by key name (already typed or as text).

    Raises:
        ConfigError: The file cannot be read or parsed, a key is unknown, a value has the
            wrong type or is not one of its choices, or a fail-closed key is set.
    """
    values: dict[str, object] = {name: key.default for name, key in KEYS.items()}
    sources = dict.fromkeys(KEYS, "default")
    layers: list[tuple[str, dict[str, object]]] = []
    if path is not None:
        layers.append((f"file {path}", _read_file(path)))
    environment = os.environ if environ is None else environ
    layers.append(
        (
            "environment",
            {_ENV_KEYS[var]: text for var, text in environment.items() if var in _ENV_KEYS},
        )
    )
    layers.append(("flag", dict(flags or {})))
    for source, layer in layers:
        for name, raw in layer.items():
            key = KEYS.get(name)
            if key is None:
                raise ConfigError(f"unknown configuration key {name!r} in {source}")
            values[name] = _coerce(key, raw, source)
            sources[name] = source.split(" ", 1)[0]
    config = Config(values, sources)
    _check_support(config)
    return config


def _read_file(path: Path) -> dict[str, object]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"configuration file {path} must be a mapping of keys to values")
    flat: dict[str, object] = {}
    _flatten(document, "", flat, path)
    return flat


def _flatten(node: dict[object, object], prefix: str, out: dict[str, object], path: Path) -> None:
    for raw_key, value in node.items():
        name = f"{prefix}{raw_key}"
        if isinstance(value, dict):
            _flatten(value, name + ".", out, path)
        elif name in out:
            raise ConfigError(f"configuration key {name!r} is set twice in {path}")
        else:
            out[name] = value


def _coerce(key: ConfigKey, raw: object, source: str) -> object:  # noqa: PLR0911, PLR0912
    where = f"{key.name} (from {source})"
    kind = key.kind
    if kind is Kind.STRINGS:
        if isinstance(raw, str):
            return [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return list(raw)
        raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
    if kind is Kind.BOOL:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if kind is Kind.INT:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {raw!r}")
    if kind is Kind.DURATION:
        if raw == 0 and not isinstance(raw, bool):
            return 0.0
        if isinstance(raw, str):
            try:
                return parse_duration(raw)
            except DurationError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        raise ConfigError(f"{where}: expected a duration such as 500ms, 5m or 1h30m, got {raw!r}")
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise ConfigError(f"{where}: expected a string, got {raw!r}")
    text = str(raw)
    if key.choices and text not in key.choices:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(key.choices)}")
    return text


def _check_support(config: Config) -> None:
    for name, key in KEYS.items():
        source = config.sources[name]
        if source == "default" or key.support is Support.SUPPORTED:
            continue
        value = config.values[name]
        if key.support is Support.FAIL_CLOSED:
            if value:
                raise ConfigError(
                    f"{name} is set (from {source}), but Flux does not support it yet; "
                    "refusing to start rather than run without it"
                )
            continue
        _log.warning("configuration key %s is not supported by Flux yet and is ignored", name)
