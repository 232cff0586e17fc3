"""Produce records to a Flux stream with flux_client.

Creates the stream ``orders`` (3 partitions) if it does not exist, sends a few records one at
a time (each send waits for its ack) and a thousand with one ``send_batch`` call, then prints
where they went. Run a broker first (``flux-broker``), then::

    python examples/python/producer.py [--address localhost:9292] [--count 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter

import flux_client
from flux_client import Record

STREAM = "orders"


async def main(address: str, count: int) -> None:
    """Create the stream if needed and produce to it."""
    async with await flux_client.connect(address) as client:
        try:
            await client.create_stream(STREAM, subject=STREAM, partitions=3)
            print(f"created stream {STREAM!r} with 3 partitions")
        except flux_client.StreamExistsError:
            print(f"stream {STREAM!r} exists; appending to it")

        # Records with the same key always land in the same partition (CRC-32 of the key).
        async with client.producer() as producer:
            for customer in ("alice", "bob", "carol"):
                meta = await producer.send(
                    STREAM, f"order from {customer}".encode(), key=customer.encode()
                )
                print(f"{customer}: partition {meta.partition}, offset {meta.offset}")

            records = [
                Record(f"order {i}".encode(), key=f"customer-{i % 10}".encode())
                for i in range(count)
            ]
            metas = await producer.send_batch(STREAM, records)
            per_partition = Counter(meta.partition for meta in metas)
            print(f"sent {len(metas)} records in one call: {dict(sorted(per_partition.items()))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address", default=os.environ.get("FLUX_ADDRESS", "localhost:9292"), help="a broker"
    )
    parser.add_argument("--count", type=int, default=1000, help="records for send_batch")
    args = parser.parse_args()
    asyncio.run(main(args.address, args.count))
