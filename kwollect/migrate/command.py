"""`kwollect migrate --from postgresql://user@host/kwdb`: a Kwollect 1.x database into this one.

Runs while the reference kwollectors keep writing to the source: without --final it copies
the ranges that ended `settle_minutes` before the source's clock; run it again (as often as
wanted: it resumes) and, once the collectors write to the target, once more with --final to
copy the newest range.  docs/migration.md gives the whole procedure.

The target is named by the usual options (db_host, db_port, db_name, db_user,
db_password_file); the source password is never on the command line: --from_password_file,
PGPASSWORD or ~/.pgpass.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from kwollect.migrate import source as src
from kwollect.migrate.copy import RangeCopier, Totals, check_grid, done_ranges, plan
from kwollect.migrate.progress import Progress
from kwollect.migrate.verify import compare
from kwollect.options import OptionError, positive_int, tool_options
from kwollect.store.dbconn import DB_DEFAULTS, connect_kwargs

MIGRATE_DEFAULTS: dict[str, Any] = {
    **DB_DEFAULTS,
    "from": "",
    "from_password_file": "",
    "range_minutes": 10,
    "settle_minutes": 10,
    "final": False,
    "verify": False,
    "jobs": 2,
    "log_level": "warning",
}

JOB_RELATIONS = ("nodetime_by_job", "nodetime_per_job")


async def connect_target(conf: dict[str, Any]) -> asyncpg.Connection:
    """A target session without the writer role's request timeouts (5 minutes by default):
    one range, or one day of --verify, may take longer at a large site."""
    conn = await asyncpg.connect(**connect_kwargs(conf))
    await conn.execute("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0")
    return conn


def check(conf: dict[str, Any]) -> None:
    if not conf["from"]:
        raise OptionError("--from is required: the source database's postgresql:// URL")
    try:
        src.check_url(conf["from"])
    except src.SourceError as exc:
        raise OptionError(str(exc)) from exc
    for key in ("range_minutes", "jobs"):
        positive_int(conf, key)
    if not isinstance(conf["settle_minutes"], int) or conf["settle_minutes"] < 0:
        raise OptionError(f"settle_minutes must be an integer >= 0, got {conf['settle_minutes']!r}")


async def copy_metrics(conf: dict[str, Any], password: str | None, name: str,
                       until: datetime | None, out: Any) -> Totals:
    target = await connect_target(conf)
    source = await src.connect(conf["from"], password)
    try:
        step = timedelta(minutes=conf["range_minutes"])
        done = await done_ranges(target, name)
        check_grid(done, step)
        totals = Totals()
        progress = Progress()
        cells: asyncio.Queue[tuple[datetime, datetime, float] | None] = asyncio.Queue(
            maxsize=conf["jobs"])

        async def emit(lo: datetime, hi: datetime, fraction: float) -> None:
            await cells.put((lo, hi, fraction))

        async def producer() -> None:
            try:
                await plan(source, done, step, until, totals, emit)
            finally:
                for _ in range(conf["jobs"]):
                    await cells.put(None)

        async def worker() -> None:
            copier = RangeCopier(await src.connect(conf["from"], password),
                                 await connect_target(conf), name, progress, totals)
            try:
                while (cell := await cells.get()) is not None:
                    lo, hi, fraction = cell
                    read, written = await copier.copy(lo, hi)
                    totals.ranges += 1
                    totals.source_rows += read
                    totals.written_rows += written
                    progress.update(fraction=fraction)
            finally:
                await copier.source.close()
                await copier.target.close()

        started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(producer())
                for _ in range(conf["jobs"]):
                    group.create_task(worker())
        finally:
            progress.close()
        elapsed = time.monotonic() - started
        rate = totals.written_rows / elapsed if elapsed > 0 else 0.0
        print(f"metrics: {totals.ranges} ranges copied ({totals.skipped} done by an earlier "
              f"run), {totals.source_rows:,} source rows read, {totals.written_rows:,} rows "
              f"written in {elapsed:.1f} s ({rate:,.0f} rows/s)", file=out)
        dups = await target.fetchrow(
            "SELECT sum(source_rows - written_rows - refused_rows) AS rows, count(*) AS ranges, "
            "min(range_start) AS first FROM kwollect.migrated_ranges "
            "WHERE source = $1 AND source_rows > written_rows + refused_rows", name)
        if dups["ranges"]:
            print(f"metrics: {dups['rows']:,} duplicate rows of the source (identical "
                  f"timestamp, device, metric, labels and value) are kept once, in "
                  f"{dups['ranges']} ranges from {dups['first'].isoformat()}", file=out)
        report_refused(totals, await target.fetchval(
            "SELECT sum(refused_rows) FROM kwollect.migrated_ranges WHERE source = $1", name),
            out)
        missing = await src.null_timestamps(source)
        if missing:
            print(f"metrics: {missing:,} source rows have no timestamp and were not copied",
                  file=out)
        return totals
    finally:
        await source.close()
        await target.close()


REFUSED_SHOWN = 20  # series listed by name; the count covers them all


def report_refused(totals: Totals, all_runs: int | None, out: Any) -> None:
    """The rows kwollect cannot hold, by series (this run's), and their total over every run."""
    if not all_runs:
        return
    print(f"metrics: {all_runs:,} source rows refused (not copied): their series cannot be "
          f"stored by kwollect", file=out)
    ranked = sorted(totals.refused.items(), key=lambda item: -item[1])
    for (device, metric, labels, reason), rows in ranked[:REFUSED_SHOWN]:
        print(f"REFUSED {rows:,} rows of device_id {device!r} metric_id {metric!r} labels "
              f"{labels}...: {reason}", file=out)
    if len(ranked) > REFUSED_SHOWN:
        print(f"REFUSED ... and {len(ranked) - REFUSED_SHOWN} more series", file=out)


async def copy_small_tables(source: asyncpg.Connection, target: asyncpg.Connection,
                            out: Any) -> None:
    """promoted_metrics and the job relations that are tables (views come from a scheduler)."""
    if await src.relation_kind(source, "public.promoted_metrics") == "table":
        rows = await source.fetch("SELECT DISTINCT device_id, metric_id "
                                  "FROM public.promoted_metrics WHERE device_id IS NOT NULL")
        status = await target.execute(
            "INSERT INTO public.promoted_metrics (device_id, metric_id) "
            "SELECT d, m FROM unnest($1::text[], $2::text[]) AS u(d, m) "
            "WHERE NOT EXISTS (SELECT 1 FROM public.promoted_metrics p "
            "                  WHERE p.device_id = u.d AND p.metric_id IS NOT DISTINCT FROM u.m)",
            [r[0] for r in rows], [r[1] for r in rows])
        print(f"promoted_metrics: {status.split()[-1]} rows added ({len(rows)} distinct in the "
              f"source)", file=out)
    for relation in JOB_RELATIONS:
        kind = await src.relation_kind(source, f"public.{relation}")
        if kind is None:
            continue
        if kind != "table":
            print(f"{relation}: a {kind} in the source (jobs come from the scheduler through "
                  f"it): not copied; connect the scheduler to kwollect (docs/migration.md)",
                  file=out)
            continue
        rows = await source.fetch(
            f"SELECT job_id, start_time, stop_time, node FROM public.{relation}")  # noqa: S608
        good = [r for r in rows if None not in (r["job_id"], r["start_time"], r["node"])]
        status = await target.execute(
            "INSERT INTO public.nodetime_per_job (job_id, start_time, stop_time, node) "
            "SELECT * FROM unnest($1::integer[], $2::timestamptz[], $3::timestamptz[], $4::text[]) "
            "ON CONFLICT DO NOTHING",
            [r["job_id"] for r in good], [r["start_time"] for r in good],
            [r["stop_time"] for r in good], [r["node"] for r in good])
        print(f"{relation}: {status.split()[-1]} job rows added to nodetime_per_job"
              + (f", {len(rows) - len(good)} without job_id, start_time or node skipped"
                 if len(rows) > len(good) else ""), file=out)


async def migrate(conf: dict[str, Any], out: Any = sys.stdout) -> int:
    password = src.read_password_file(conf["from_password_file"])
    source = await src.connect(conf["from"], password)
    try:
        target = await connect_target(conf)
    except BaseException:
        await source.close()
        raise
    try:
        name = await src.describe(source, conf["from"])
        until = None
        if not conf["final"]:
            until = await source.fetchval("SELECT now() - make_interval(mins => $1)",
                                          conf["settle_minutes"])
        print(f"source {name}" + (f", ranges ending before {until.isoformat()}" if until
                                   else ", every range (final pass)"), file=out)
        await copy_metrics(conf, password, name, until, out)
        async with target.transaction():
            await copy_small_tables(source, target, out)
        if not conf["verify"]:
            return 0
        verified_until = await target.fetchval(
            "SELECT max(range_end) FROM kwollect.migrated_ranges WHERE source = $1", name)
        days, differences, refused = await compare(source, target, verified_until)
        for difference in differences:
            print(f"DIFFERENT {difference}", file=out)
        print(f"verify: {days} days compared up to "
              f"{verified_until.isoformat() if verified_until else '-'}, "
              f"{len(differences)} series-days differ"
              + (f", {refused} series-days of refused series not compared" if refused else ""),
              file=out)
        return 1 if differences else 0
    finally:
        await source.close()
        await target.close()


EXPECTED = (src.SourceError, OSError, asyncpg.PostgresError)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main(argv: Sequence[str]) -> int:
    conf = tool_options("kwollect migrate", MIGRATE_DEFAULTS, argv, check, description=__doc__)
    if conf is None:
        return 2
    try:
        return asyncio.run(migrate(conf))
    except (*EXPECTED, BaseExceptionGroup) as exc:
        errors = _leaves(exc)
        if not all(isinstance(error, EXPECTED) for error in errors):
            raise
        for error in errors:
            print(f"kwollect migrate: {error}", file=sys.stderr)
        return 1
