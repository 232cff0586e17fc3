"""How fast a consumer group hands a departed member's partitions to the survivors.

A real ``flux-broker`` process (:class:`flux_testing.broker.BrokerProcess`, embedded NATS,
default settings unless ``--consumer-timeout`` says otherwise) serves one stream of
``--partitions`` (12) partitions read by a group of ``--members`` (3). Each run removes one
member and times how long until the survivors **hold** the new assignment: their latest
assignments together cover every partition. Then a fresh member joins and the group settles
(untimed) before the next run; each member goes at a random point of the polling schedule
(a seeded uniform wait of up to one poll interval). Two ways to leave:

- **leave**: the member calls ``LeaveConsumerGroup``; its partitions have no owner and go to the
  survivors at once;
- **killed**: the member's gRPC channel is closed abruptly (what the broker sees of a process
  killed with -9: its connection ends, no leave); the broker removes it after
  ``groups.consumer.timeout`` (15 s by default).

Two kinds of members, the same in every other respect:

- **push** (Flux): each member holds ``WatchConsumerGroupAssignments`` open and, when an update
  lists partitions being revoked from it, confirms at once (``FetchConsumerGroupAssignments`` at
  the update's epoch), as the Flux SDKs are to do;
- **poll** (the baseline: Liftbridge's Go client at default settings): each member polls
  ``FetchConsumerGroupAssignments`` every 0.4 x the consumer timeout (6 s), and on an epoch
  mismatch reads the group's epoch with ``FetchMetadata`` and polls again at once (the Go
  client may also wait 2 s there; this baseline does not, in its favour).

It prints p50 / p99 / max per case and the ratio poll / push of the medians. This is a program,
not a test: it never fails on speed, only when the broker answers wrongly or not at all (every
wait is bounded). Run it from the repository root::

    .venv/bin/python broker/bench/groups_bench.py            # full run, default timeouts (~4 min)
    .venv/bin/python broker/bench/groups_bench.py --quick    # smoke run, 2 s timeout (~30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc

from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing.broker import BrokerProcess

GROUP: Final = "bench"
STREAM: Final = "orders"
CALL_TIMEOUT_S: Final = 10.0
#: Bound on one run (the killed cases wait a whole consumer timeout).
RUN_TIMEOUT_S: Final = 120.0
#: Bound on the group settling between runs.
SETTLE_TIMEOUT_S: Final = 60.0
#: The Go client polls its assignments every 0.4 x the consumer timeout.
GO_POLL_FRACTION: Final = 0.4


class BenchError(Exception):
    """The broker answered wrongly or not at all."""


def say(line: str = "") -> None:
    """Print a line of the report at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


def _flat(assignments: Sequence[api_pb2.PartitionAssignment]) -> frozenset[int]:
    return frozenset(p for a in assignments if a.stream == STREAM for p in a.partitions)


@dataclass
class Member:
    """One group member on its own gRPC channel; push or poll."""

    consumer_id: str
    address: str
    push: bool
    poll_interval_s: float
    held: frozenset[int] = frozenset()
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _channel: grpc.aio.Channel | None = None
    _task: asyncio.Task[None] | None = None
    _poke: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        """Join the group and start watching or polling."""
        self._channel = grpc.aio.insecure_channel(self.address)
        api = api_pb2_grpc.APIStub(self._channel)
        await api.JoinConsumerGroup(
            api_pb2.JoinConsumerGroupRequest(
                groupId=GROUP, consumerId=self.consumer_id, streams=[STREAM]
            ),
            timeout=CALL_TIMEOUT_S,
        )
        loop = self._watch(api) if self.push else self._poll(api)
        self._task = asyncio.create_task(loop, name=self.consumer_id)

    def poke(self) -> None:
        """Poll now (between runs only, to settle the group quickly)."""
        self._poke.set()

    async def leave(self) -> None:
        """Stop watching or polling, then leave the group cleanly."""
        assert self._channel is not None
        api = api_pb2_grpc.APIStub(self._channel)
        await self._stop_loop()
        await api.LeaveConsumerGroup(
            api_pb2.LeaveConsumerGroupRequest(groupId=GROUP, consumerId=self.consumer_id),
            timeout=CALL_TIMEOUT_S,
        )
        await self._channel.close()

    async def kill(self) -> None:
        """End the connection without a leave, as a process killed with -9 would."""
        assert self._channel is not None
        await self._channel.close(grace=None)
        await self._stop_loop()

    async def _stop_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._task
            self._task = None

    def _hold(self, partitions: frozenset[int]) -> None:
        self.held = partitions
        self.changed.set()

    async def _watch(self, api: api_pb2_grpc.APIAsyncStub) -> None:
        call = api.WatchConsumerGroupAssignments(
            api_pb2.WatchConsumerGroupAssignmentsRequest(groupId=GROUP, consumerId=self.consumer_id)
        )
        async for update in call:
            self._hold(_flat(update.assignments))
            if update.revoking:
                # Stop reading, commit, confirm: at once (nothing to commit in this bench).
                with contextlib.suppress(grpc.aio.AioRpcError):  # the epoch moved on: next
                    await api.FetchConsumerGroupAssignments(
                        api_pb2.FetchConsumerGroupAssignmentsRequest(
                            groupId=GROUP, consumerId=self.consumer_id, epoch=update.epoch
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )

    async def _poll(self, api: api_pb2_grpc.APIAsyncStub) -> None:
        epoch = await _group_epoch(api)
        while True:
            try:
                response = await api.FetchConsumerGroupAssignments(
                    api_pb2.FetchConsumerGroupAssignmentsRequest(
                        groupId=GROUP, consumerId=self.consumer_id, epoch=epoch
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as error:
                if _reason(error) != "group-epoch-mismatch":
                    raise
                epoch = await _group_epoch(api)  # the Go client's metadata refresh
                continue
            epoch = response.epoch
            self._hold(_flat(response.assignments))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.poll_interval_s)
            self._poke.clear()


async def _group_epoch(api: api_pb2_grpc.APIAsyncStub) -> int:
    response = await api.FetchMetadata(
        api_pb2.FetchMetadataRequest(groups=[GROUP]), timeout=CALL_TIMEOUT_S
    )
    return int(response.groupMetadata[0].epoch)


async def _until(condition: object, members: list[Member], timeout_s: float, what: str) -> None:
    """Wait, woken by the members' changes, until ``condition()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out after {timeout_s:g}s waiting for {what}")
        waits = [asyncio.ensure_future(m.changed.wait()) for m in members]
        try:
            await asyncio.wait(waits, timeout=min(left, 0.05), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        for member in members:
            member.changed.clear()


async def _settled(api: api_pb2_grpc.APIAsyncStub, members: list[Member], partitions: int) -> None:
    """Every member holds what the broker says it owns, with no revocation pending."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        for member in members:
            member.poke()
        described = await api.DescribeConsumerGroup(
            api_pb2.DescribeConsumerGroupRequest(groupId=GROUP), timeout=CALL_TIMEOUT_S
        )
        owned = {m.consumerId: _flat(m.assignments) for m in described.members}
        revoking = any(m.revoking for m in described.members)
        held = {m.consumer_id: m.held for m in members}
        covered = frozenset().union(*owned.values()) == frozenset(range(partitions))
        if not revoking and covered and owned == held:
            return
        await asyncio.sleep(0.02)
    raise BenchError("the group did not settle")


@dataclass
class Case:
    """One timed case and its timings, in seconds."""

    name: str
    push: bool
    killed: bool
    seconds: list[float] = field(default_factory=list)


async def run_case(
    case: Case, address: str, args: argparse.Namespace, poll_interval_s: float
) -> None:
    """Run ``case``: a fresh group, then remove a member and replace it, once per run."""
    async with grpc.aio.insecure_channel(address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        members = [
            Member(f"{case.name}-{i}", address, case.push, poll_interval_s)
            for i in range(args.members)
        ]
        for member in members:
            await member.start()
        await _settled(api, members, args.partitions)
        runs = args.kill_runs if case.killed else (args.runs if case.push else args.poll_runs)
        everything = frozenset(range(args.partitions))
        phases = random.Random(args.seed)  # noqa: S311 - timing jitter, not secrets
        for run in range(runs):
            doomed, survivors = members[-1], members[:-1]
            # The member goes at a random point of the polling schedule (untimed wait).
            await asyncio.sleep(phases.uniform(0, poll_interval_s))
            started = time.monotonic()
            if case.killed:
                await doomed.kill()
            else:
                await doomed.leave()
            await _until(
                lambda s=survivors: frozenset().union(*(m.held for m in s)) == everything,
                survivors,
                RUN_TIMEOUT_S,
                "the survivors to hold every partition",
            )
            case.seconds.append(time.monotonic() - started)
            replacement = Member(f"{case.name}-r{run}", address, case.push, poll_interval_s)
            await replacement.start()
            members = [*survivors, replacement]
            await _settled(api, members, args.partitions)
            say(f"  {case.name} run {run + 1}/{runs}: {case.seconds[-1] * 1000:.1f} ms")
        for member in members:
            await member.leave()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def _broker(root: Path, env: dict[str, str]) -> AsyncIterator[BrokerProcess]:
    broker = await BrokerProcess.start(root / "data", work_dir=root / "run", env=env)
    try:
        yield broker
    finally:
        await broker.stop()


async def main_async(args: argparse.Namespace) -> list[Case]:
    """Start a broker and run every case against it."""
    env = {}
    timeout_s = args.consumer_timeout
    if timeout_s != 15.0:
        env["FLUX_GROUPS_CONSUMER_TIMEOUT"] = f"{timeout_s}s"
    poll_interval_s = GO_POLL_FRACTION * timeout_s
    cases = [
        Case("push-leave", push=True, killed=False),
        Case("poll-leave", push=False, killed=False),
        Case("push-killed", push=True, killed=True),
        Case("poll-killed", push=False, killed=True),
    ]
    with tempfile.TemporaryDirectory(prefix="groups-bench-") as tmp:
        async with _broker(Path(tmp), env) as broker:
            async with grpc.aio.insecure_channel(broker.address) as channel:
                await api_pb2_grpc.APIStub(channel).CreateStream(
                    api_pb2.CreateStreamRequest(
                        name=STREAM, subject=STREAM, partitions=args.partitions
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            say(
                f"broker pid {broker.pid}; {args.members} members, {args.partitions} "
                f"partitions, consumer timeout {timeout_s:g}s, poll every {poll_interval_s:g}s",
            )
            for case in cases:
                if case.killed and args.kill_runs == 0:
                    continue
                await run_case(case, broker.address, args, poll_interval_s)
    return cases


def report(cases: list[Case]) -> None:
    """Print p50 / p99 / max per case and the poll / push ratios."""
    say()
    say(f"{'case':<12} {'runs':>4} {'p50 ms':>10} {'p99 ms':>10} {'max ms':>10}")
    medians: dict[str, float] = {}
    for case in cases:
        if not case.seconds:
            continue
        p50 = statistics.median(case.seconds)
        medians[case.name] = p50
        say(
            f"{case.name:<12} {len(case.seconds):>4} {p50 * 1000:>10.1f} "
            f"{_percentile(case.seconds, 0.99) * 1000:>10.1f} {max(case.seconds) * 1000:>10.1f}"
        )
    for how in ("leave", "killed"):
        push, poll = medians.get(f"push-{how}"), medians.get(f"poll-{how}")
        if push and poll:
            say(f"{how}: poll / push p50 = {poll / push:.1f}x")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few runs, 2 s consumer timeout")
    parser.add_argument("--members", type=int, default=3, help="group size (default 3)")
    parser.add_argument("--partitions", type=int, default=12, help="partitions (default 12)")
    parser.add_argument("--runs", type=int, default=30, help="push-leave runs (default 30)")
    parser.add_argument("--poll-runs", type=int, default=8, help="poll-leave runs (default 8)")
    parser.add_argument("--kill-runs", type=int, default=3, help="killed runs each (default 3)")
    parser.add_argument(
        "--consumer-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="groups.consumer.timeout (default 15, the broker's)",
    )
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random phases")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.poll_runs, args.kill_runs, args.consumer_timeout = 5, 3, 1, 2.0
    if args.members < 2:
        parser.error("--members must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 1 if the broker answered wrongly or not at all."""
    args = parse_args(argv)
    try:
        cases = asyncio.run(main_async(args))
    except BenchError as error:
        sys.stderr.write(f"groups_bench: {error}\n")
        return 1
    report(cases)
    if args.json is not None:
        args.json.write_text(
            json.dumps({c.name: c.seconds for c in cases if c.seconds}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
