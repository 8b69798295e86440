"""`cdcflow warehouse-merge`: merge into the warehouse dimensions and facts.

- default (lake mode): every table with a warehouse target (or `--table`), dimensions first, reads its
  new changes from the bronze Delta table, runs the staging_to_dimension / dimension_to_fact quality
  stages and transforms, and merges (batch/warehouse_job.py, Spark); prints the DQ summary and writes
  the JSON report under `<lake>/_reports/dq/`.
- `--staging FILE`: load a Parquet staging batch (docs/design.md "Warehouse staging") for one `--table`
  and merge it, Spark-free.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register_warehouse_merge(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("warehouse-merge", help="merge new lake changes (or a staging file) into dimensions / facts")
    p.add_argument("--table", action="append", help="configured table, e.g. shop.customers; repeatable")
    p.add_argument("--staging", help="Parquet file or folder holding the staging rows of one --table (no Spark)")
    p.add_argument("--url", help="warehouse URL (default: warehouse.url from pipeline.yaml)")
    p.add_argument("--schema", help="warehouse schema (default: warehouse.schema from pipeline.yaml)")

    def run(args: argparse.Namespace) -> int:
        from cdcflow.config import load_project
        from cdcflow.errors import UserError

        project = load_project(args.config)
        url = args.url or project.pipeline.warehouse.url
        if not url:
            print("no warehouse URL: pass --url or set warehouse.url")
            return 2
        unknown = [t for t in args.table or [] if t not in project.tables]
        if unknown:
            raise UserError(f"unknown table(s): {', '.join(unknown)}")
        if args.staging:
            return _from_staging(args, project, url)
        return _from_lake(args, project, url)

    commands["warehouse-merge"] = run


def _from_staging(args: argparse.Namespace, project, url: str) -> int:
    import dataclasses
    import json

    from batch.warehouse import merge_table
    from cdcflow.errors import UserError

    if not args.table or len(args.table) != 1:
        raise UserError("--staging needs exactly one --table")
    result = merge_table(url, project, args.table[0], read_staging(args.staging), schema=args.schema)
    print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0


def read_staging(path: str):
    """The staging file (or folder) as an Arrow table; a missing or unreadable one is the user's to fix."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cdcflow.errors import UserError

    if not Path(path).exists():
        raise UserError(f"--staging {path}: no such file or folder")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"--staging {path}: not readable as Parquet ({str(e).splitlines()[0]})") from None


def _from_lake(args: argparse.Namespace, project, url: str) -> int:
    from batch.warehouse.connection import connect
    from batch.warehouse_job import merge_from_lake, summary_rows
    from cdcflow.aws import require_lake
    from cdcflow.cli import console, print_table
    from cdcflow.runtime import get_spark

    require_lake(project)
    connect(project, url).close()  # before Spark starts: an unreachable warehouse is one line
    spark = get_spark("cdcflow-warehouse-merge", shuffle_partitions=project.pipeline.spark.shuffle_partitions)
    run = merge_from_lake(spark, project, url, tables=args.table, schema=args.schema)
    print_table(f"data quality, run {run.run_id}", ["table", "stage", "rows", "failures (rule, severity, rows)",
                                                    "quarantined", "merged"], summary_rows(run))
    console.print(f"report: {run.report_path}")
    return 0
