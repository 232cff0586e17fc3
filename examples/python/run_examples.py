"""Run every Python example against a fresh broker and check what each prints.

Used by ``nox -s examples``: starts a real ``flux-broker`` (embedded NATS, temporary data
directory, free ports), runs ``producer.py`` then ``consumer.py`` as separate processes with
``FLUX_ADDRESS`` pointing at it, and fails unless each exits 0 and prints the lines expected.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

from flux_testing.broker import BrokerProcess

HERE: Final = Path(__file__).parent
EXAMPLE_TIMEOUT_S: Final = 60.0
#: Each example and a pattern its output must match.
EXPECTED: Final = (
    ("producer.py", r"sent 1000 records in one call"),
    ("consumer.py", r"read 1003 records: \{0: \d+, 1: \d+, 2: \d+\}"),
)


def run(script: str, address: str) -> str:
    """Run one example against ``address``; its output (exits if it failed)."""
    print(f"--- {script}", flush=True)
    result = subprocess.run(
        [sys.executable, str(HERE / script)],
        env={**os.environ, "FLUX_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"{script} exited with {result.returncode}:\n{result.stderr}")
    return result.stdout


async def main() -> None:
    """Start a broker, run the examples in order, check their output."""
    with tempfile.TemporaryDirectory(prefix="flux-examples-") as root:
        broker = await BrokerProcess.start(Path(root) / "data", work_dir=Path(root))
        try:
            for script, pattern in EXPECTED:
                output = await asyncio.to_thread(run, script, broker.address)
                if not re.search(pattern, output):
                    raise SystemExit(f"{script}: expected output matching {pattern!r}")
        finally:
            await broker.stop()
    print("--- every example ran and printed what it should")


if __name__ == "__main__":
    asyncio.run(main())
