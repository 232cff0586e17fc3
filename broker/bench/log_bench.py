"""Throughput of the commit log (``flux_broker.log``) against a minimal Python baseline.

What is measured, for 128 B and 1 KiB records (value size; null key, no headers):

- **append, one by one**: ``await log.append([record])`` per record;
- **append, batches of 1,000**: ``await log.append(records)``;
- **append_framed, batches of 1,000**: ``await log.append_framed(data)`` where ``data`` was
  framed beforehand with :func:`flux_broker.log.format.frame` (framing is not timed; the log
  still verifies and stamps every record);

each under the three sync policies (``never``, ``interval``, ``always``). Under ``always``
batches of 100 are also appended by one task and by 8 concurrent tasks, which shows group
commit: concurrent appends share fsyncs (the fsync count is printed). Then a log is filled and
read sequentially from offset 0 with ``reader.read(1 << 20)``, once as raw batches and once
decoding every record with ``batch.records()`` (the page cache is warm: the data was just
written). Each case runs in a fresh log (closing it, with its fsync, is not timed) and is
repeated (``--repeat``, default 3); the run of median throughput is reported.

The **baseline**, measured in the same run, is a minimal Python loop that frames each record
(28-byte header, body with its CRC-32C) into a ``bytearray`` and writes it to a plain file with
one ``write`` per 1,000 records and no fsync. Every case reports records/s, MB/s (10^6 bytes of
framed records, headers included) and its ratio to the baseline of the same record size; the
issue's targets are printed beside the results, with whether each is met. This is a program,
not a test: it never fails on speed.

Data goes to a temporary directory (under ``--data-dir``, default the system temporary
directory); results are also written as JSON (``--json``). Run it from the repository root::

    .venv/bin/python broker/bench/log_bench.py            # the full run (1-2 minutes)
    .venv/bin/python broker/bench/log_bench.py --quick    # a smoke run of a few seconds
    nox -s bench -- --quick                               # the same through nox

``--only append-1000/never --size 128 --records 1000000`` runs one case longer (for a profiler).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, Literal

from crc32c import crc32c

from flux_broker.log import FileCommitLog, LogConfig, NewRecord, SyncPolicy
from flux_broker.log.format import HEADER_BYTES, MIN_BODY_BYTES, Placement, frame

SIZES: Final = (128, 1024)
POLICIES: Final = (SyncPolicy.NEVER, SyncPolicy.INTERVAL, SyncPolicy.ALWAYS)
BATCH: Final = 1000  # records per batched append and per baseline write
SMALL_BATCH: Final = 100  # records per append of the group-commit cases
TASKS: Final = 8  # concurrent appenders of the group-commit case
POOL: Final = 16  # distinct batches cycled through (more data than the CPU caches hold)
READ_BYTES: Final = 1 << 20
DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "log_bench.json"
TARGET_SIZE: Final = 128


@dataclass(frozen=True, slots=True)
class Plan:
    """How many records each case appends or reads.

    Attributes:
        records: Records of the bulk cases (batched appends, reads, baseline).
        single: Most records appended one by one (``never``, ``interval``).
        single_always: Most records appended one by one under ``always`` (fsync-bound).
        single_time_s: Time after which a one-by-one case stops early.
    """

    records: int
    single: int
    single_always: int
    single_time_s: float


FULL: Final = Plan(records=200_000, single=40_000, single_always=3_000, single_time_s=3.0)
QUICK: Final = Plan(records=5_000, single=1_000, single_always=100, single_time_s=0.5)


@dataclass(slots=True)
class Measurement:
    """What one timed region did."""

    records: int
    seconds: float
    appends: int | None = None
    fsyncs: int | None = None

    @property
    def rate(self) -> float:
        """Records per second."""
        return self.records / self.seconds


@dataclass(slots=True)
class Result:
    """One case's runs, as printed and written to the JSON file; the median run counts."""

    case_id: str
    label: str
    size: int
    policy: str | None
    record_bytes: int
    runs: list[Measurement]
    baseline_ratio: float | None = None

    @property
    def measurement(self) -> Measurement:
        """The run of median throughput."""
        return sorted(self.runs, key=lambda m: m.rate)[len(self.runs) // 2]

    @property
    def rate(self) -> float:
        """Records per second (median run)."""
        return self.measurement.rate

    @property
    def mb_per_s(self) -> float:
        """Framed bytes per second, in 10^6 bytes."""
        return self.rate * self.record_bytes / 1e6

    def notes(self, run: Measurement | None = None) -> str:
        """Fsync counts of ``run`` (default: the median run), where the case syncs."""
        m = run or self.measurement
        if m.fsyncs is None:
            return ""
        note = f"{m.fsyncs:,} fsyncs"
        if m.appends and m.fsyncs:
            note += f", {m.appends / m.fsyncs:.1f} appends/fsync"
        return note

    def to_json(self) -> dict[str, object]:
        """The JSON form."""
        m = self.measurement
        return {
            "case": self.case_id,
            "label": self.label,
            "record_value_bytes": self.size,
            "record_framed_bytes": self.record_bytes,
            "sync_policy": self.policy,
            "records": m.records,
            "seconds": m.seconds,
            "records_per_s": self.rate,
            "mb_per_s": self.mb_per_s,
            "ratio_to_baseline": self.baseline_ratio,
            "appends": m.appends,
            "fsyncs": m.fsyncs,
            "runs_records_per_s": [run.rate for run in self.runs],
        }


@dataclass(frozen=True, slots=True)
class Target:
    """A performance target of the issue, for 128 B records."""

    label: str
    case_id: str
    metric: Literal["rate", "ratio"]
    threshold: float

    def measured(self, results: dict[str, Result]) -> float | None:
        """The measured value, or ``None`` when the case did not run."""
        result = results.get(self.case_id)
        if result is None:
            return None
        return result.rate if self.metric == "rate" else result.baseline_ratio

    def describe(self, value: float | None) -> tuple[str, str, str]:
        """``(measured, target, met)`` as printed."""
        if self.metric == "rate":
            wanted = f">= {self.threshold:,.0f} rec/s"
            shown = "not run" if value is None else f"{value:,.0f} rec/s"
        else:
            wanted = f">= {self.threshold:.2f}x baseline"
            shown = "not run" if value is None else f"{value:.2f}x"
        met = "-" if value is None else ("yes" if value >= self.threshold else "NO")
        return shown, wanted, met


TARGETS: Final = (
    Target("batched append, never (vs baseline)", "append-1000/never/128", "ratio", 0.7),
    Target("batched append, never", "append-1000/never/128", "rate", 1_000_000),
    Target("client-framed batches, never", "framed-1000/never/128", "rate", 3_000_000),
    Target("batched append, always", "append-1000/always/128", "rate", 300_000),
    Target("sequential read", "read/-/128", "rate", 1_000_000),
)


@dataclass(slots=True)
class Workload:
    """Pre-built inputs for one record size, so building them is never timed."""

    size: int
    values: list[bytes]
    records: list[NewRecord]
    batches: list[list[NewRecord]]
    small_batches: list[list[NewRecord]]
    framed: list[bytes]
    record_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        """Derive the framed size of one record."""
        self.record_bytes = HEADER_BYTES + MIN_BODY_BYTES + self.size


def build_workload(size: int) -> Workload:
    """Random values of ``size`` bytes, as records, batches and client-framed batches."""
    values = [os.urandom(size) for _ in range(POOL * BATCH)]
    records = [NewRecord(value) for value in values]
    batches = [records[i * BATCH : (i + 1) * BATCH] for i in range(POOL)]
    small_batches = [records[i * SMALL_BATCH : (i + 1) * SMALL_BATCH] for i in range(POOL)]
    dummy = Placement(0, 0, 0, 0, 0)  # the log stamps the real offsets, time and epoch
    limits = LogConfig()
    framed = [
        bytes(frame(batch, dummy, limits.record_max_bytes, limits.batch_max_bytes)[0])
        for batch in batches
    ]
    return Workload(size, values, records, batches, small_batches, framed)


# -- the baseline ------------------------------------------------------------------------------

_BASE_HEADER: Final = struct.Struct(">QqQI")  # offset, timestamp, leader epoch, body size
_BASE_PREFIX: Final = struct.Struct(">bbii")  # magic, attributes, key length, value length
_BASE_CRC: Final = struct.Struct(">I")
_NO_HEADERS: Final = b"\x00\x00"


def baseline_frame(buffer: bytearray, values: Sequence[bytes], first: int, count: int) -> None:
    """Append records ``first`` to ``first + count`` to ``buffer``, framed in a minimal loop."""
    pack_header, pack_prefix, pack_crc = _BASE_HEADER.pack, _BASE_PREFIX.pack, _BASE_CRC.pack
    timestamp_ns = time.time_ns()
    pool = len(values)
    for offset in range(first, first + count):
        value = values[offset % pool]
        rest = pack_prefix(1, 0, -1, len(value)) + value + _NO_HEADERS
        buffer += pack_header(offset, timestamp_ns, 0, 4 + len(rest))
        buffer += pack_crc(crc32c(rest))
        buffer += rest


def check_baseline(work: Workload) -> None:
    """Make sure the baseline writes the log's own format (it must do the same work)."""
    ours = bytearray()
    baseline_frame(ours, work.values, 0, 1)
    (timestamp_ns,) = struct.unpack_from(">q", ours, 8)
    at = Placement(0, timestamp_ns, 0, 0, 0)
    theirs, _index = frame(work.records[:1], at, 1 << 20, 1 << 20)
    if ours != theirs or len(ours) != work.record_bytes:
        raise SystemExit("log_bench: the baseline does not frame records like the log")


def run_baseline(path: Path, work: Workload, total: int) -> Measurement:
    """Frame ``total`` records in a Python loop and write them, one write per 1,000."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        buffer = bytearray()
        start = time.perf_counter()
        for first in range(0, total, BATCH):
            baseline_frame(buffer, work.values, first, BATCH)
            _write_all(fd, buffer)
            buffer.clear()
        seconds = time.perf_counter() - start
        os.fsync(fd)  # untimed: leave no dirty pages behind for the next case
    finally:
        os.close(fd)
    records = _round_up(total, BATCH)
    return Measurement(records=records, seconds=seconds, appends=records // BATCH)


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


# -- the log cases -----------------------------------------------------------------------------


async def append_one_by_one(
    log: FileCommitLog, work: Workload, limit: int, time_cap_s: float
) -> Measurement:
    """``await log.append([record])`` until ``limit`` records or ``time_cap_s`` seconds."""
    records = work.records
    pool = len(records)
    count = 0
    start = time.perf_counter()
    deadline = start + time_cap_s
    now = start
    while count < limit:
        await log.append([records[count % pool]])
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    return Measurement(records=count, seconds=now - start, appends=count)


async def append_batches(log: FileCommitLog, work: Workload, total: int) -> Measurement:
    """``await log.append(batch)`` with batches of 1,000 until ``total`` records."""
    batches = work.batches
    appends = -(-total // BATCH)
    start = time.perf_counter()
    for i in range(appends):
        await log.append(batches[i % POOL])
    seconds = time.perf_counter() - start
    return Measurement(records=appends * BATCH, seconds=seconds, appends=appends)


async def append_framed(log: FileCommitLog, work: Workload, total: int) -> Measurement:
    """``await log.append_framed(data)`` with pre-framed batches of 1,000."""
    framed = work.framed
    appends = -(-total // BATCH)
    start = time.perf_counter()
    for i in range(appends):
        await log.append_framed(framed[i % POOL])
    seconds = time.perf_counter() - start
    return Measurement(records=appends * BATCH, seconds=seconds, appends=appends)


async def append_concurrently(
    log: FileCommitLog, work: Workload, total: int, tasks: int
) -> Measurement:
    """``tasks`` tasks each append batches of 100 until ``total`` records in all."""
    per_task = -(-total // (SMALL_BATCH * tasks))

    async def appender(task: int) -> None:
        for i in range(per_task):
            await log.append(work.small_batches[(task + i * tasks) % POOL])

    start = time.perf_counter()
    await asyncio.gather(*(appender(task) for task in range(tasks)))
    seconds = time.perf_counter() - start
    appends = per_task * tasks
    return Measurement(records=appends * SMALL_BATCH, seconds=seconds, appends=appends)


async def read_all(log: FileCommitLog, *, decode: bool) -> Measurement:
    """Read the whole log from offset 0 in 1 MiB batches, decoding every record if asked."""
    total = log.newest_offset + 1
    reader = log.reader(0, committed=False)
    count = 0
    reads = 0
    start = time.perf_counter()
    while count < total:
        batch = await reader.read(READ_BYTES)
        reads += 1
        if decode:
            for _record in batch.records():
                count += 1
        else:
            count += batch.count
    seconds = time.perf_counter() - start
    reader.close()
    return Measurement(records=count, seconds=seconds, appends=reads)


# -- running -----------------------------------------------------------------------------------

LogCase = Callable[[FileCommitLog], Awaitable[Measurement]]


@dataclass(frozen=True, slots=True)
class Case:
    """A case to run: an id (for ``--only`` and the JSON), a label and what to time."""

    case_id: str
    label: str
    size: int
    policy: SyncPolicy | None
    run: LogCase | None  # None: the baseline


def plan_cases(work: Workload, plan: Plan) -> list[Case]:
    """Every case of one record size, baseline first."""
    n, size = plan.records, work.size
    cases = [Case(f"baseline/-/{size}", "baseline: Python loop + write", size, None, None)]
    for policy in POLICIES:
        p = policy.value
        single = plan.single_always if policy is SyncPolicy.ALWAYS else plan.single
        one_by_one = partial(
            append_one_by_one, work=work, limit=single, time_cap_s=plan.single_time_s
        )
        cases += [
            Case(f"append-1/{p}/{size}", f"append 1 by 1, {p}", size, policy, one_by_one),
            Case(
                f"append-1000/{p}/{size}",
                f"append batch 1000, {p}",
                size,
                policy,
                partial(append_batches, work=work, total=n),
            ),
            Case(
                f"framed-1000/{p}/{size}",
                f"append_framed 1000, {p}",
                size,
                policy,
                partial(append_framed, work=work, total=n),
            ),
        ]
    always = SyncPolicy.ALWAYS
    for tasks in (1, TASKS):
        cases.append(
            Case(
                f"append-100x{tasks}/always/{size}",
                f"append batch 100, always, {tasks} task{'s' if tasks > 1 else ''}",
                size,
                always,
                partial(append_concurrently, work=work, total=n, tasks=tasks),
            )
        )
    cases += [
        Case(f"read/-/{size}", "read 1 MiB batches", size, None, partial(read_all, decode=False)),
        Case(
            f"read-decode/-/{size}",
            "read 1 MiB batches + decode",
            size,
            None,
            partial(read_all, decode=True),
        ),
    ]
    return cases


async def fill(log: FileCommitLog, work: Workload, total: int) -> None:
    """Append ``total`` records (untimed) for the read cases."""
    for i in range(-(-total // BATCH)):
        await log.append_framed(work.framed[i % POOL])


async def run_case(case: Case, work: Workload, plan: Plan, root: Path) -> Measurement:
    """Run one case in a fresh directory under ``root`` and remove it afterwards."""
    directory = root / case.case_id.replace("/", "_")
    try:
        if case.run is None:
            directory.mkdir()
            gc.collect()
            return run_baseline(directory / "baseline.log", work, plan.records)
        reading = case.policy is None
        policy = SyncPolicy.NEVER if reading else case.policy
        assert policy is not None
        log = await FileCommitLog.open(directory, LogConfig(sync_policy=policy))
        try:
            if reading:
                await fill(log, work, plan.records)
            gc.collect()
            syncs_before = log._syncer.syncs
            measurement = await case.run(log)
            if policy is not SyncPolicy.NEVER:
                measurement.fsyncs = log._syncer.syncs - syncs_before
            if reading:
                measurement.appends = None  # it counted reads; not reported
            return measurement
        finally:
            await log.close()  # untimed; its fsync also flushes the page cache for the next case
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def say(line: str = "") -> None:
    """Print a line at once (progress goes to stdout with the results)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def selected(case_id: str, only: Sequence[str]) -> bool:
    """Whether ``--only`` keeps the case (every case when it was not given)."""
    return not only or any(pattern in case_id for pattern in only)


async def run_all(args: argparse.Namespace, plan: Plan) -> list[Result]:
    """Run the selected cases of each record size; progress lines as they finish."""
    workloads = [build_workload(size) for size in args.size]
    only: list[str] = args.only
    repeat: int = args.repeat
    work_cases = [
        (work, [c for c in plan_cases(work, plan) if c.run is None or selected(c.case_id, only)])
        for work in workloads
    ]
    total = sum(len(cases) for _work, cases in work_cases)
    results: list[Result] = []
    done = 0
    with tempfile.TemporaryDirectory(prefix="flux-log-bench-", dir=args.data_dir) as tmp:
        say(f"data in {tmp}")
        for work, cases in work_cases:
            check_baseline(work)
            baseline: float | None = None
            for case in cases:
                done += 1
                say(f"[{done:2}/{total}] {case.label} ({case.size} B, {case.case_id})")
                policy = None if case.policy is None else case.policy.value
                result = Result(case.case_id, case.label, case.size, policy, work.record_bytes, [])
                for _ in range(repeat):
                    m = await run_case(case, work, plan, Path(tmp))
                    result.runs.append(m)
                    note = result.notes(m)
                    say(
                        f"        {m.records:,} records in {m.seconds:.2f} s: {m.rate:,.0f} rec/s, "
                        f"{m.rate * work.record_bytes / 1e6:,.1f} MB/s{'; ' if note else ''}{note}"
                    )
                if case.run is None:
                    baseline = result.rate
                if baseline is not None:
                    result.baseline_ratio = result.rate / baseline
                results.append(result)
    return results


def report(results: list[Result]) -> list[str]:
    """The results table and the targets, as lines."""
    lines = [
        "",
        "Results: median run; MB = 10^6 bytes of framed records (header included); "
        "ratio = to the baseline of the same size",
    ]
    header = f"{'case':<40} {'size':>6} {'records/s':>12} {'MB/s':>8} {'ratio':>6}  notes"
    lines += [header, "-" * len(header)]
    for r in results:
        ratio = "" if r.baseline_ratio is None else f"{r.baseline_ratio:.2f}x"
        line = f"{r.label:<40} {r.size:>4} B {r.rate:>12,.0f} {r.mb_per_s:>8,.1f} {ratio:>6}  "
        lines.append((line + r.notes()).rstrip())
    by_id = {r.case_id: r for r in results}
    lines += ["", f"Targets of the issue ({TARGET_SIZE} B records)"]
    header = f"{'target':<40} {'measured':>16} {'wanted':>24}  met"
    lines += [header, "-" * len(header)]
    for target in TARGETS:
        shown, wanted, met = target.describe(target.measured(by_id))
        lines.append(f"{target.label:<40} {shown:>16} {wanted:>24}  {met}")
    return lines


def write_json(path: Path, args: argparse.Namespace, plan: Plan, results: list[Result]) -> None:
    """Write the results, targets and run context as JSON."""
    by_id = {r.case_id: r for r in results}
    document = {
        "benchmark": "log_bench",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "plan": {
            "quick": args.quick,
            "records": plan.records,
            "single": plan.single,
            "single_always": plan.single_always,
            "single_time_s": plan.single_time_s,
            "repeat": args.repeat,
            "sizes": args.size,
            "only": args.only,
        },
        "results": [r.to_json() for r in results],
        "targets": [target_json(t, t.measured(by_id)) for t in TARGETS],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def target_json(target: Target, measured: float | None) -> dict[str, object]:
    """The JSON form of a target and what was measured for it."""
    return {
        "target": target.label,
        "case": target.case_id,
        "metric": target.metric,
        "threshold": target.threshold,
        "measured": measured,
        "met": None if measured is None else measured >= target.threshold,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="log_bench.py",
        description="Commit-log throughput (append, append_framed, read) under each sync "
        "policy, against a minimal Python framing-and-write loop run in the same process.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: a smoke run of a few seconds"
    )
    parser.add_argument(
        "--records",
        type=int,
        metavar="N",
        help=f"records per bulk case (default {FULL.records:,}; {QUICK.records:,} with "
        "--quick); one-by-one cases append at most this many",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="R",
        help="runs of each case; the median counts (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the results as JSON (default broker/bench/results/log_bench.json)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="parent of the temporary data directory (default: the system temporary directory)",
    )
    parser.add_argument(
        "--size",
        type=int,
        action="append",
        choices=SIZES,
        help="record value size in bytes; repeat for several (default: all)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only cases whose id contains PATTERN, e.g. append-1000/never or framed "
        "(repeatable; the baseline always runs)",
    )
    args = parser.parse_args(argv)
    if args.records is not None and args.records <= 0:
        parser.error("--records must be positive")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    elif args.repeat <= 0:
        parser.error("--repeat must be positive")
    args.size = args.size or list(SIZES)
    return args


def choose_plan(args: argparse.Namespace) -> Plan:
    """The record counts for the arguments."""
    plan = QUICK if args.quick else FULL
    if args.records is None:
        return plan
    n = args.records
    return Plan(
        records=n,
        single=min(n, plan.single),
        single_always=min(n, plan.single_always),
        single_time_s=plan.single_time_s,
    )


async def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print and write its results."""
    args = parse_args(argv)
    plan = choose_plan(args)
    started = time.perf_counter()
    say(
        f"log_bench: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
        f"{plan.records:,} records per bulk case, one by one at most {plan.single:,} "
        f"({plan.single_always:,} under always) or {plan.single_time_s:g} s; "
        f"median of {args.repeat} run(s) per case"
    )
    results = await run_all(args, plan)
    for line in report(results):
        say(line)
    write_json(args.json, args, plan, results)
    say("")
    say(f"JSON written to {args.json}; total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
