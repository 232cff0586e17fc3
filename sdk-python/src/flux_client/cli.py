"""The ``flux`` command-line tool (placeholder until the SDK issue adds its commands)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flux_client import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``flux``."""
    parser = argparse.ArgumentParser(
        prog="flux",
        description="Command-line tool for Flux streams (no commands yet in this release).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flux`` and return its exit status."""
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0
