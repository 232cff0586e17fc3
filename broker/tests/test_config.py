"""Configuration: Liftbridge files load, precedence is defaults < file < environment < flags."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flux_broker.config import KEYS, ConfigError, Support, env_name, load_config
from flux_broker.duration import DurationError, parse_duration
from flux_broker.log import SyncPolicy

# A Liftbridge configuration as its documentation writes them: nested and flat keys, Go
# durations, and keys for features Flux does not have.
LIFTBRIDGE_FILE = """\
listen: 0.0.0.0:9293
host: broker-1.example
port: 9293
logging:
  level: debug
  raft: true
data:
  dir: /var/lib/liftbridge
batch.max.messages: 512
nats:
  servers:
    - nats://127.0.0.1:4222
    - nats://127.0.0.1:4223
  user: flux
  password: secret
streams:
  retention.max.age: 24h
  retention.max.messages: 100000
  cleaner.interval: 1m30s
  segment:
    max.bytes: 67108864
  compact.enabled: true
clustering:
  server.id: broker-1
  namespace: prod
  raft.bootstrap.seed: true
  replica.max.lag.time: 20s
  min.insync.replicas: 2
activity.stream.enabled: true
cursors:
  stream:
    partitions: 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "liftbridge.yaml"
    path.write_text(text)
    return path


def test_a_liftbridge_file_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_config(write(tmp_path, LIFTBRIDGE_FILE), environ={})
    assert config.string("host") == "broker-1.example"
    assert config.integer("port") == 9293
    assert config.strings("nats.servers") == ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
    assert config.seconds("streams.retention.max.age") == 86400
    assert config.seconds("streams.cleaner.interval") == 90
    assert config.integer("streams.segment.max.bytes") == 64 * 1024 * 1024
    assert config.string("clustering.namespace") == "prod"
    assert config.sources["host"] == "file"
    assert config.sources["port"] == "file"
    # Features Flux lacks are named in a warning, not silently dropped.
    warned = caplog.text
    for key in ("clustering.raft.bootstrap.seed", "clustering.min.insync.replicas", "logging.raft"):
        assert key in warned
    log_config = config.log_config()
    assert log_config.compact_enabled
    assert log_config.retention_max_messages == 100000
    assert log_config.sync_policy is SyncPolicy.ALWAYS


def test_defaults_without_a_file() -> None:
    config = load_config(environ={})
    assert (config.string("host"), config.integer("port")) == ("localhost", 9292)
    assert config.string("streams.sync.policy") == "always"
    assert config.integer("cursors.stream.partitions") == 1  # Flux's deliberate default
    assert set(config.sources.values()) == {"default"}


def test_unknown_keys_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'streams\.segment\.max\.byte'"):
        load_config(write(tmp_path, "streams:\n  segment.max.byte: 10\n"), environ={})


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("port: nine\n", "port .*expected an integer"),
        ("port: true\n", "port .*expected an integer"),
        ("streams.retention.max.age: 60\n", "expected a duration"),
        ("streams.retention.max.age: 5 minutes\n", "use a number with a unit"),
        ("streams.compact.enabled: maybe\n", "expected true or false"),
        ("streams.sync.policy: sometimes\n", "not one of always, interval, never"),
        ("nats.servers: [1, 2]\n", "expected a list of strings"),
        ("- just\n- a list\n", "must be a mapping"),
        ("port: [unclosed\n", "not valid YAML"),
        ("port: 1\nport.x: 2\n", "unknown configuration key 'port.x'"),
        ("streams.segment.max.bytes: 1\nstreams:\n  segment.max.bytes: 2\n", "set twice"),
    ],
    ids=[
        "int-word",
        "int-bool",
        "bare-duration",
        "duration-words",
        "bool-word",
        "choice",
        "list-type",
        "not-mapping",
        "bad-yaml",
        "prefix-of-value",
        "duplicate",
    ],
)
def test_bad_values_fail_clearly(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    "text",
    ["tls:\n  key: server.key\n  cert: server.crt\n", "tls.client.auth.enabled: true\n",
     "streams.encryption: true\n"],
    ids=["server-tls", "mtls", "encryption"],
)  # fmt: skip
def test_security_keys_fail_closed(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="refusing to start"):
        load_config(write(tmp_path, text), environ={})


def test_disabled_security_keys_are_fine(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "tls.client.auth.enabled: false\n"), environ={})
    assert config.boolean("tls.client.auth.enabled") is False


def test_nats_credentials_and_tls_are_honoured(tmp_path: Path) -> None:
    text = (
        "nats:\n  user: u\n  password: p\n  tls:\n    cert: c.pem\n    key: k.pem\n    ca: ca.pem\n"
    )
    config = load_config(write(tmp_path, text), environ={})
    assert KEYS["nats.tls.ca"].support is Support.SUPPORTED
    assert (config.string("nats.user"), config.string("nats.tls.ca")) == ("u", "ca.pem")


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 1000\nhost: from-file\nstreams.segment.max.age: 1h\n")
    environ = {
        env_name("port"): "2000",
        "FLUX_STREAMS_SEGMENT_MAX_AGE": "30m",
        "FLUX_NATS_SERVERS": "nats://a:4222, nats://b:4222",
        "UNRELATED": "x",
    }
    config = load_config(path, environ=environ, flags={"port": 3000})
    assert config.integer("port") == 3000
    assert config.sources["port"] == "flag"
    assert config.string("host") == "from-file"
    assert config.seconds("streams.segment.max.age") == 1800
    assert config.sources["streams.segment.max.age"] == "environment"
    assert config.strings("nats.servers") == ["nats://a:4222", "nats://b:4222"]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_every_key_has_a_default_of_its_kind() -> None:
    config = load_config(environ={})
    for name in KEYS:
        assert config.values[name] == KEYS[name].default


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("500ms", 0.5), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5),
     ("-2m", -120.0), ("300us", 0.0003), ("2µs", 2e-6), ("10ns", 1e-8)],
)  # fmt: skip
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5x", "1h 30m", "h1", "--1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)
