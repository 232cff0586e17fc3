"""Read a Flux stream with flux_client: every partition, from the first record to the last.

Subscribes to all partitions of ``orders`` at once (``subscribe_stream``) from the earliest
record and stops at the newest one present when it subscribed (``Stop.LATEST``), then prints
how many records each partition had. Run ``producer.py`` first::

    python examples/python/consumer.py [--address localhost:9292]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter

import flux_client
from flux_client import Start, Stop

STREAM = "orders"


async def main(address: str) -> None:
    """Read every partition of the stream once, up to its newest record."""
    async with await flux_client.connect(address) as client:
        counts: Counter[int] = Counter()
        first: flux_client.Message | None = None
        async for message in client.subscribe_stream(
            STREAM, start=Start.EARLIEST, stop=Stop.LATEST
        ):
            first = first or message
            counts[message.partition] += 1
        if first is not None:
            print(
                f"first record: partition {first.partition}, offset {first.offset}, "
                f"key {first.key!r}, value {first.value!r}"
            )
        print(f"read {sum(counts.values())} records: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address", default=os.environ.get("FLUX_ADDRESS", "localhost:9292"), help="a broker"
    )
    args = parser.parse_args()
    asyncio.run(main(args.address))
