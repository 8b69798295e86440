"""`cdcflow warehouse-merge`: merge a staging batch into the warehouse, Spark-free.

The batch is read from Parquet (staging shape of docs/design.md "Warehouse staging"); reading it from
silver/bronze Delta is wired on the Spark side, which can call `merge_table` with its Arrow table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register_warehouse_merge(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("warehouse-merge", help="load a staging batch and merge it into its dimension / fact table")
    p.add_argument("--table", required=True, help="configured table, e.g. shop.customers")
    p.add_argument("--staging", required=True, help="Parquet file or folder holding the staging rows")
    p.add_argument("--url", help="warehouse URL (default: warehouse.url from pipeline.yaml)")
    p.add_argument("--schema", help="warehouse schema (default: warehouse.schema from pipeline.yaml)")

    def run(args: argparse.Namespace) -> int:
        import dataclasses
        import json

        import pyarrow.parquet as pq

        from batch.warehouse import merge_table
        from cdcflow.config import load_project

        project = load_project(args.config)
        url = args.url or project.pipeline.warehouse.url
        if not url:
            print("no warehouse URL: pass --url or set warehouse.url")
            return 2
        result = merge_table(url, project, args.table, pq.read_table(args.staging), schema=args.schema)
        print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
        return 0

    commands["warehouse-merge"] = run
