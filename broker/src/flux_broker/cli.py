"""The ``flux-broker`` command line: flags, configuration, logging, then the broker.

Flags win over ``FLUX_<KEY>`` environment variables, which win over the ``--config`` file
(see :mod:`flux_broker.config`). Exit status: 0 after a graceful shutdown (SIGTERM, SIGINT),
1 when the broker cannot start or its embedded NATS server dies, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from flux_broker import __version__, logs
from flux_broker.config import ConfigError, load_config
from flux_broker.nats.embedded import DEFAULT_PORT as EMBEDDED_NATS_DEFAULT_PORT
from flux_broker.server import BrokerSettings, serve

__all__ = ["build_parser", "main"]

DEFAULT_HOST: Final = "localhost"
DEFAULT_PORT: Final = 9292  # Liftbridge's default gRPC port, so existing clients find us.
DEFAULT_DATA_DIR: Final = Path("flux-data")
_PORT_MAX: Final = 65535

#: Python logging level of each ``logging.level`` value (Liftbridge's names).
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
#: Log records kept while the configuration (which chooses their format) is loaded.
_EARLY_RECORDS_MAX: Final = 1000


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``flux-broker``."""
    parser = argparse.ArgumentParser(
        prog="flux-broker",
        description=(
            "Flux broker: durable, replayable message streams for NATS, serving a gRPC API "
            "wire-compatible with Liftbridge (service proto.API, API v1.9.0). Without "
            "--nats-servers it runs its own NATS server, so this one command is all you need."
        ),
        epilog=(
            "Configuration: a YAML file with Liftbridge's keys (--config), overridden by "
            "FLUX_<KEY> environment variables (FLUX_STREAMS_SYNC_POLICY=never), overridden by "
            "these flags. SIGTERM or SIGINT shuts the broker down gracefully."
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML configuration file; real Liftbridge config files load",
    )
    parser.add_argument(
        "--server-id",
        metavar="ID",
        help="broker id (clustering.server.id); default: generated on the first start and "
        "kept in the data directory",
    )
    parser.add_argument(
        "--namespace",
        metavar="NAME",
        help="NATS namespace of the broker's own subjects (clustering.namespace; "
        "default: liftbridge-default)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"directory for segment files and the metadata database (data.dir; default: "
        f"./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--host",
        help=f"host advertised to clients in metadata (host; default: {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"gRPC port advertised to clients, and bound unless --listen says otherwise "
        f"(port; default: {DEFAULT_PORT}; 0 = any free port, advertised as bound)",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address the gRPC server binds (listen; default: --host:--port), e.g. 0.0.0.0:9292 "
        "behind a load balancer that clients reach as --host:--port",
    )
    parser.add_argument(
        "--nats-servers",
        metavar="URLS",
        help="comma-separated NATS server URLs to use instead of the embedded server "
        "(nats.servers), e.g. nats://nats-1:4222,nats://nats-2:4222",
    )
    parser.add_argument(
        "--embedded-nats",
        action="store_true",
        help="run the embedded NATS server even if the configuration names servers "
        "(nats.embedded); cannot be combined with --nats-servers",
    )
    parser.add_argument(
        "--embedded-nats-port",
        type=int,
        default=EMBEDDED_NATS_DEFAULT_PORT,
        metavar="PORT",
        help="client port of the embedded NATS server on 127.0.0.1 (default: %(default)s; "
        "0 = any free port)",
    )
    parser.add_argument(
        "--level",
        choices=sorted(_LEVELS),
        help="log level (logging.level; default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=[f.value for f in logs.LogFormat],
        help="log line format (logging.format; default: text): text for people, json for one "
        "JSON object per line (time, level, component, stream, partition, message)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics (/metrics) and health checks (/healthz, /readyz) over "
        "HTTP on this port of the listen host (metrics.port; default: -1 = off; 0 = any free "
        "port, reported in --ready-file and the log)",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help="once serving, write a JSON description (pid, gRPC address, NATS URL) to FILE, "
        "for supervisors and tests; removed at shutdown",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """Configuration keys set on the command line."""
    by_key = {
        "clustering.server.id": args.server_id,
        "clustering.namespace": args.namespace,
        "data.dir": None if args.data_dir is None else str(args.data_dir),
        "host": args.host,
        "port": args.port,
        "listen": args.listen,
        "nats.servers": args.nats_servers,
        "nats.embedded": True if args.embedded_nats else None,
        "logging.level": args.level,
        "logging.format": args.log_format,
        "metrics.port": args.metrics_port,
    }
    return {key: value for key, value in by_key.items() if value is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flux-broker`` and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.embedded_nats and args.nats_servers:
        parser.error("--embedded-nats and --nats-servers cannot be combined: choose one NATS")
    if args.port is not None and not 0 <= args.port <= _PORT_MAX:
        parser.error(f"--port must be between 0 and {_PORT_MAX}, got {args.port}")
    if not 0 <= args.embedded_nats_port <= _PORT_MAX:
        parser.error(
            f"--embedded-nats-port must be between 0 and {_PORT_MAX}, got {args.embedded_nats_port}"
        )
    if args.metrics_port is not None and not -1 <= args.metrics_port <= _PORT_MAX:
        parser.error(f"--metrics-port must be between -1 and {_PORT_MAX}, got {args.metrics_port}")
    # What loading the configuration logs waits for the format the configuration chooses.
    early = logging.handlers.BufferingHandler(_EARLY_RECORDS_MAX)
    root = logging.getLogger()
    level = root.level
    root.addHandler(early)
    root.setLevel(logging.INFO)
    try:
        config = load_config(args.config, flags=_flags(args))
    except ConfigError as error:
        root.removeHandler(early)
        root.setLevel(level)
        _replay(early, logging.StreamHandler(sys.stderr))
        sys.stderr.write(f"flux-broker: configuration error: {error}\n")
        return 1
    root.removeHandler(early)
    handler = logs.configure(
        logs.LogFormat(config.string("logging.format")),
        _LEVELS[config.string("logging.level")],
    )
    _replay(early, handler)
    data_dir = Path(config.string("data.dir") or DEFAULT_DATA_DIR).resolve()
    embedded = (
        args.embedded_nats or config.boolean("nats.embedded") or not config.strings("nats.servers")
    )
    settings = BrokerSettings(
        config=config,
        data_dir=data_dir,
        embedded_nats=embedded,
        embedded_nats_port=args.embedded_nats_port,
        ready_file=None if args.ready_file is None else args.ready_file.resolve(),
    )
    return asyncio.run(serve(settings))


def _replay(early: logging.handlers.BufferingHandler, handler: logging.Handler) -> None:
    """Hand the records ``early`` kept to ``handler`` (if their level passes)."""
    level = logging.getLogger().level
    if not isinstance(handler.formatter, logging.Formatter):
        handler.setFormatter(logs.formatter(logs.LogFormat.TEXT))
    for record in early.buffer:
        if record.levelno >= level:
            handler.handle(record)
    early.close()
