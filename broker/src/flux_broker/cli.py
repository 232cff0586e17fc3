"""The ``flux-broker`` command line.

For now a placeholder: it parses the flags the quick start uses, prints what a broker would
serve and that the broker itself is not implemented yet, and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flux_broker import __version__

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 9292  # Liftbridge's default gRPC port, so existing clients find us.
DEFAULT_DATA_DIR = Path("flux-data")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``flux-broker``."""
    parser = argparse.ArgumentParser(
        prog="flux-broker",
        description=(
            "Flux broker: durable, replayable message streams for NATS, serving a gRPC API "
            "wire-compatible with Liftbridge (service proto.API, API v1.9.0)."
        ),
        epilog="Placeholder release: the broker is not implemented yet; see the project issues.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="directory for segment files and the metadata database (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="host advertised to clients in metadata (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="gRPC port advertised to clients (default: %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flux-broker`` and return its exit status."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        build_parser().error(f"--port must be between 1 and 65535, got {args.port}")
    sys.stdout.write(
        f"flux-broker {__version__} (placeholder)\n"
        f"  would serve gRPC on {args.host}:{args.port} with an embedded NATS server\n"
        f"  would keep its data in {args.data_dir.resolve()}\n"
        "The broker is not implemented yet: this foundation release only ships the API spec,\n"
        "the generated code and the tooling. Exiting.\n"
    )
    return 0
