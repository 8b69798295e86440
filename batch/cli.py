"""`cdcflow full-load`: apply DMS S3 Parquet output (full load + CDC files) to the silver Delta tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdcflow.config import Project


def reload_time(text: str, project: Project) -> datetime:
    """`--as-of`: `dms` (when the stack's S3 task began its last, finished, full load: asks DMS) or an
    ISO 8601 time (DMS's FullLoadStartTime as `aws dms describe-table-statistics` prints it); without a
    zone, UTC."""
    from cdcflow.errors import UserError

    if text.strip() == "dms":
        from cdcflow.aws import dms_full_load_start

        return dms_full_load_start(project)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(f"--as-of {text!r}: not an ISO 8601 time (e.g. 2026-12-06T10:15:00Z) or dms") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when > datetime.now(UTC):  # above every change to come until then, not where the snapshot is
        raise UserError(f"--as-of {text}: after now; give when DMS began the reload")
    return when


def register_full_load(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("full-load", help="apply DMS S3 Parquet (LOAD + CDC files) to the silver Delta tables")
    p.add_argument("--table", action="append", help="only this table (schema.table); repeatable")
    p.add_argument("--raw", help="override dms.raw_uri (a local folder or s3:// URI)")
    p.add_argument("--timestamp-column", default="dms_commit_ts", help="the DMS TimestampColumnName (commit time)")
    p.add_argument("--no-archive", action="store_true", help="leave applied files in place")
    p.add_argument("--reload", action="append", default=[], metavar="TABLE",
                   help="the table's LOAD files are a DMS reload's complete snapshot (run once DMS reports the "
                        "reload complete): applied after everything silver holds, keys it lacks deleted; repeatable")
    p.add_argument("--as-of", metavar="TIME",
                   help="with --reload: when DMS began the reload, ISO 8601 (UTC if no zone), or `dms`: ask DMS "
                        "when the stack's S3 task began its last finished full load. Needed when the table's "
                        "changes come through Kinesis: the snapshot then sorts at that commit time, below every "
                        "change committed after it")
    commands["full-load"] = run


def run(args: argparse.Namespace) -> int:
    import os

    from rich.progress import Progress

    from batch.full_load import RawStore, run_full_load
    from cdcflow.aws import require_lake
    from cdcflow.cli import console, print_table
    from cdcflow.config import load_project
    from cdcflow.errors import UserError
    from cdcflow.runtime import get_spark

    if args.raw:
        os.environ["CDCFLOW_RAW_URI"] = args.raw
    project = load_project(args.config)
    unknown = [t for t in [*(args.table or []), *args.reload] if t not in project.tables]
    if unknown:
        raise UserError(f"unknown table(s): {', '.join(unknown)}")
    if args.table and set(args.reload) - set(args.table):
        raise UserError(f"--reload {', '.join(sorted(set(args.reload) - set(args.table)))}: not among --table")
    if args.as_of and not args.reload:
        raise UserError("--as-of: only with --reload TABLE")
    as_of = reload_time(args.as_of, project) if args.as_of else None
    RawStore(project).require()  # before Spark starts: a wrong --raw is one line, not 0 files "ok"
    require_lake(project)
    spark = get_spark("cdcflow-full-load", batch=True)
    with Progress(console=console) as progress:
        result = run_full_load(spark, project, args.table, args.timestamp_column, not args.no_archive, progress,
                               reload=args.reload, reload_as_of=as_of)
    print_table("full load", list(result.COLUMNS), result.summary_rows())
    console.print(f"{result.files} files applied, {result.skipped} already applied, {result.rows} rows, "
                  f"{result.quarantined} quarantined")
    for line in result.reload_lines():
        console.print(line)
    problem = result.rewritten_problem()
    if problem:
        raise UserError(problem)
    return 0


def register_compact(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("compact", help="OPTIMIZE / Z-ORDER / tombstone GC / VACUUM the Delta tables that need it")
    p.add_argument("--table", action="append", help="only this table (schema.table); repeatable")
    p.add_argument("--vacuum-hours", type=int, default=None,
                   help="VACUUM retention in hours (default and minimum: defaults.vacuum_min_retention_hours, 168)")
    p.add_argument("--allow-short-retention", action="store_true",
                   help="allow --vacuum-hours below the floor (a running stream or reader may then fail)")
    p.add_argument("--every", default=None, help="run again every DURATION (e.g. 1h, 30m) until stopped; "
                                                "SIGTERM/Ctrl-C end it between tables")
    p.add_argument("--metrics-file", default=None, help="write EMF metric lines here instead of stdout")
    commands["compact"] = run_compact


def _seconds(text: str) -> float:
    from cdcflow.errors import UserError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UserError(f"--every {text!r}: use a number with s, m, h or d (e.g. 1h)") from None


def run_compact(args: argparse.Namespace) -> int:
    import signal
    import time

    from batch.compaction import Stop, check_retention
    from cdcflow.aws import require_lake
    from cdcflow.cli import console
    from cdcflow.config import load_project
    from cdcflow.errors import UserError
    from cdcflow.metrics import MetricsSink
    from cdcflow.runtime import get_spark

    project = load_project(args.config)
    unknown = [t for t in args.table or [] if t not in project.tables]
    if unknown:
        raise UserError(f"unknown table(s): {', '.join(unknown)}")
    hours = project.pipeline.defaults.vacuum_min_retention_hours if args.vacuum_hours is None else args.vacuum_hours
    check_retention(project, hours, args.allow_short_retention)  # before Spark starts: one clear line
    require_lake(project)
    every = _seconds(args.every) if args.every else None

    def stop(signum, _frame) -> None:
        console.print(f"signal {signum}: stopping after the current table")
        Stop.requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    spark = get_spark("cdcflow-compact")
    metrics = MetricsSink(project.pipeline.name, path=args.metrics_file)
    while not Stop.requested:
        next_run = time.monotonic() + (every or 0)
        run_compaction(spark, project, args.table, hours, args.allow_short_retention, metrics, console.print)
        if every is None:
            break
        while not Stop.requested and time.monotonic() < next_run:
            time.sleep(1)
    return 0


def run_compaction(spark, project, tables, vacuum_hours: int, allow_short_retention: bool, metrics, say) -> dict:
    """One compaction run: compact, print the per-table summary, write the JSON report, emit EMF."""
    import time
    from datetime import UTC, datetime

    from batch.compaction import compact, emit_metrics, report
    from cdcflow.cli import print_table
    from cdcflow.reports import write_report

    started, t0 = datetime.now(UTC), time.perf_counter()
    results = compact(spark, project, tables, vacuum_hours=vacuum_hours, allow_short_retention=allow_short_retention)
    summary = report(results, started, time.perf_counter() - t0)
    print_table("compaction", ["table", "partition", "action", "files before", "files after", "MB before",
                               "MB after", "tombstones removed", "spectrum manifest", "seconds"],
                [[r.table, r.partition or "", r.action, r.files_before, r.files_after,
                  round(r.bytes_before / 2**20, 1), round(r.bytes_after / 2**20, 1), r.tombstones_removed,
                  r.manifest, r.seconds] for r in results
                 if r.action == "compacted" or r.manifest.startswith(("skipped", "failed")) or len(results) <= 50])
    where = write_report(project, "compaction", started.strftime("%Y%m%dT%H%M%SZ"), summary)
    say(f"{summary['tables_compacted']} compacted, {summary['tables_skipped']} skipped (healthy), "
        f"{summary['files_removed']} files removed, {summary['manifests_written']} Spectrum manifests rewritten"
        + (f" (not readable by Spectrum: {', '.join(summary['manifests_skipped'])})" if summary["manifests_skipped"]
           else "") + f", {summary['seconds']} s; report {where}")
    emit_metrics(metrics, summary)
    return summary
