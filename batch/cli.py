"""`cdcflow full-load`: apply DMS S3 Parquet output (full load + CDC files) to the silver Delta tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register_full_load(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("full-load", help="apply DMS S3 Parquet (LOAD + CDC files) to the silver Delta tables")
    p.add_argument("--table", action="append", help="only this table (schema.table); repeatable")
    p.add_argument("--raw", help="override dms.raw_uri (a local folder or s3:// URI)")
    p.add_argument("--timestamp-column", default="dms_commit_ts", help="the DMS TimestampColumnName (commit time)")
    p.add_argument("--no-archive", action="store_true", help="leave applied files in place")
    commands["full-load"] = run


def run(args: argparse.Namespace) -> int:
    import os

    from rich.progress import Progress

    from batch.full_load import run_full_load
    from cdcflow.cli import console, print_table
    from cdcflow.config import load_project
    from cdcflow.errors import UserError
    from cdcflow.runtime import get_spark

    if args.raw:
        os.environ["CDCFLOW_RAW_URI"] = args.raw
    project = load_project(args.config)
    unknown = [t for t in args.table or [] if t not in project.tables]
    if unknown:
        raise UserError(f"unknown table(s): {', '.join(unknown)}")
    spark = get_spark("cdcflow-full-load")
    with Progress(console=console) as progress:
        result = run_full_load(spark, project, args.table, args.timestamp_column, not args.no_archive, progress)
    print_table("full load", ["table", "rows"], [[t, n] for t, n in sorted(result.per_table.items())])
    console.print(f"{result.files} files applied, {result.skipped} already applied, {result.rows} rows, "
                  f"{result.quarantined} quarantined")
    return 0


def register_compact(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("compact", help="OPTIMIZE / Z-ORDER / tombstone GC / VACUUM the Delta tables")
    p.add_argument("--table", action="append", help="only this table (schema.table); repeatable")
    p.add_argument("--vacuum-hours", type=int, default=168, help="VACUUM retention in hours (default 168)")
    commands["compact"] = run_compact


def run_compact(args: argparse.Namespace) -> int:
    from batch.compaction import compact
    from cdcflow.cli import print_table
    from cdcflow.config import load_project
    from cdcflow.errors import UserError
    from cdcflow.runtime import get_spark

    project = load_project(args.config)
    unknown = [t for t in args.table or [] if t not in project.tables]
    if unknown:
        raise UserError(f"unknown table(s): {', '.join(unknown)}")
    results = compact(get_spark("cdcflow-compact"), project, args.table, vacuum_hours=args.vacuum_hours)
    print_table("compaction", ["table", "files before", "files after", "tombstones removed"],
                [[r.table, r.files_before, r.files_after, r.tombstones_removed] for r in results])
    return 0
