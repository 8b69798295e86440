"""Benchmark: what `cdcflow compact` buys and what a scheduled run over many tables costs.

    python -m benchmarks.compaction [--commits 2000] [--tables 1000]

1. `small_commits`: a silver table built by N small commits the way the stream's delta-rs writer
   makes them (a guarded MERGE of a few changes each: `apply.merge_clauses`), and bronze after the
   same load (one append per micro-batch, partitioned by table and date). Files before and after
   `compact`, and a point lookup by primary key and an aggregate query (Spark, median of 3) before
   and after, in the same run: `files_ratio`, `point_lookup_speedup`, `aggregate_speedup`. Twice:
   new orders with sequential ids (`small_commits`) and with ids spread over the key space
   (`small_commits_random_keys`, as UUID- or hash-like keys are).
2. `many_tables`: a lake of N synthetic tables where 5% have enough small files to need work; one
   `compact` run end to end (the others are skipped from the Delta log alone).

Writes benchmarks/results/compaction.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import save_result
from benchmarks.streaming import REPO, _project

RESULTS = REPO / "benchmarks" / "results" / "compaction.json"


def _orders(keys: list[int], seq: int, op: str = "upsert"):
    import pyarrow as pa

    now = datetime.now(UTC)
    n = len(keys)
    return pa.table({
        "order_id": pa.array(keys, pa.int64()), "customer_id": pa.array([k % 97 for k in keys], pa.int64()),
        "status": pa.array(["placed" if op == "insert" else "shipped"] * n),
        "order_date": pa.array([now.date()] * n, pa.date32()),
        "total_amount": pa.array([f"{k % 500}.25" for k in keys]).cast(pa.decimal128(12, 2)),
        "shipping_phone": pa.array(["[REDACTED]"] * n), "updated_at": pa.array([now] * n, pa.timestamp("us", "UTC")),
        "_op": pa.array([op] * n), "_seq": pa.array([f"{seq:020d}"] * n),
        "_commit_ts": pa.array([now] * n, pa.timestamp("us", "UTC")), "_partial": pa.array([False] * n),
        "_ingested_at": pa.array([now] * n, pa.timestamp("us", "UTC")),
    })  # fmt: skip


def _build_silver(project, commits: int, rows: int, keys: str) -> tuple[str, int]:
    """Silver of shop.orders by `commits` small delta-rs MERGEs (the stream's commit, without Spark),
    and a key to look up. `keys`: "sequential" (new orders take the next ids: each small file holds a
    narrow key range, so data skipping prunes a lookup even before compaction) or "random" (ids spread
    over the key space, as UUID- or hash-like keys are: every small file spans the whole range)."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from cdcflow.cdc.apply import SILVER_META, merge_clauses, rs_uri, silver_options
    from cdcflow.cdc.changes import TableShape

    table = project.table("shop.orders")
    shape = TableShape(table)
    path = rs_uri(project.path(table.delta_path))
    rng = random.Random(3)
    new_keys = (lambda n, start: list(range(start, start + n))) if keys == "sequential" else \
        (lambda n, start: [rng.randrange(1, 2**40) for _ in range(n)])
    inserted = new_keys(rows, 0)
    first = _orders(inserted, 0, "insert")
    first = first.append_column("_is_deleted", pa.array([False] * rows)).append_column(
        "_deleted_at", pa.array([None] * rows, pa.timestamp("us", "UTC")))
    cols = [*shape.output_columns, *SILVER_META]
    write_deltalake(path, first.select(cols), mode="append", configuration=silver_options(table))
    m = merge_clauses(shape, [], lambda c: '"' + c + '"')
    lookup_key = None
    for i in range(1, commits):
        # mostly new orders (a new small file each commit), now and then an update of a recent one
        fresh = new_keys(9, len(inserted))
        batch = fresh + ([inserted[rng.randrange(len(inserted) - 50, len(inserted))]] if i % 10 == 0 else [])
        inserted += fresh
        if i == commits // 2:
            lookup_key = fresh[0]  # an order written mid-stream
        src = _orders(batch, i)
        (DeltaTable(path).merge(src, predicate=m.on, source_alias="s", target_alias="t")
         .when_matched_update(updates=m.update_upsert, predicate=m.match_upsert)
         .when_not_matched_insert(updates=m.insert).execute())
    return path, lookup_key if lookup_key is not None else inserted[0]


def _build_bronze(project, commits: int) -> str:
    """Bronze after the same load: one small append per micro-batch into the (table, date) partition."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from cdcflow.cdc.apply import rs_uri

    path = rs_uri(project.path("bronze"))
    today = datetime.now(UTC).date()
    for i in range(commits):
        n = 10
        write_deltalake(path, pa.table({
            "table": pa.array(["shop.orders"] * n), "date": pa.array([today] * n, pa.date32()),
            "op": pa.array(["update"] * n), "payload": pa.array([f'{{"order_id": {i * n + k}}}' for k in range(n)]),
            "batch_id": pa.array([i] * n, pa.int64()),
        }), mode="append", partition_by=["table", "date"])  # fmt: skip
    return path


def _median_seconds(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def small_commits(spark, work: Path, commits: int, keys: str = "sequential") -> dict:
    from batch.compaction import compact, log_files

    project = _project(work, REPO / "configs", CDCFLOW_RAW_URI=str(work / "raw"))
    silver, key = _build_silver(project, commits, rows=20_000, keys=keys)
    bronze = _build_bronze(project, commits)
    df = lambda: spark.read.format("delta").load(silver)  # noqa: E731 - re-read: a new snapshot each time
    lookup = lambda: df().filter(f"order_id = {key}").collect()  # noqa: E731
    assert len(lookup()) == 1  # the lookup finds its order: not a vacuous timing
    aggregate = lambda: df().groupBy("status").agg({"total_amount": "sum", "order_id": "count"}).collect()  # noqa: E731
    before = {"silver_files": len(log_files(silver)[()].sizes), "bronze_files": sum(len(f.sizes) for f in
                                                                                     log_files(bronze, ("table", "date")).values()),
              "lookup_s": _median_seconds(lookup), "aggregate_s": _median_seconds(aggregate)}  # fmt: skip
    started = time.perf_counter()
    compact(spark, project, now=datetime.now(UTC))
    seconds = time.perf_counter() - started
    after = {"silver_files": len(log_files(silver)[()].sizes), "bronze_files": sum(len(f.sizes) for f in
                                                                                    log_files(bronze, ("table", "date")).values()),
             "lookup_s": _median_seconds(lookup), "aggregate_s": _median_seconds(aggregate)}  # fmt: skip
    return {
        "keys": keys, "commits": commits, "before": before, "after": after, "compact_seconds": round(seconds, 1),
        "files_ratio": round(before["silver_files"] / max(1, after["silver_files"]), 1),
        "bronze_files_ratio": round(before["bronze_files"] / max(1, after["bronze_files"]), 1),
        "point_lookup_speedup": round(before["lookup_s"] / after["lookup_s"], 1),
        "aggregate_speedup": round(before["aggregate_s"] / after["aggregate_s"], 1),
    }  # fmt: skip


def many_tables(spark, work: Path, tables: int) -> dict:
    import pyarrow as pa
    from deltalake import write_deltalake

    from batch.compaction import compact
    from cdcflow.cdc.apply import rs_uri
    from cdcflow.sim.synthetic import write_configs

    project = _project(work, write_configs(REPO / "configs", work / "configs", tables),
                       CDCFLOW_RAW_URI=str(work / "raw"))
    synth = sorted(n for n in project.tables if n.startswith("synth."))
    needy = set(synth[:: 20])  # 5%
    for name in synth:
        path = rs_uri(project.path(project.table(name).delta_path))
        for i in range(12 if name in needy else 1):
            write_deltalake(path, pa.table({"id": pa.array([i], pa.int64()), "_seq": pa.array([str(i)])}), mode="append")
    started = time.perf_counter()
    results = compact(spark, project, tables=synth, now=datetime.now(UTC))
    seconds = time.perf_counter() - started
    return {"tables": len(synth), "needing_work": len(needy),
            "compacted": sum(1 for r in results if r.action == "compacted"),
            "skipped": sum(1 for r in results if r.action.startswith("skipped")),
            "seconds": round(seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from cdcflow.runtime import get_spark

    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--tables", type=int, default=1000)
    ap.add_argument("--only", choices=["small_commits", "small_commits_random_keys", "many_tables"],
                    help="run one measurement and keep the others' last results (each takes 10-25 min)")
    args = ap.parse_args(argv)
    spark = get_spark("cdcflow-bench-compaction")
    work = Path(tempfile.mkdtemp(prefix="cdcflow-bench-compaction-"))
    runs = {"small_commits": lambda: small_commits(spark, work / "a", args.commits),
            "small_commits_random_keys": lambda: small_commits(spark, work / "c", args.commits, keys="random"),
            "many_tables": lambda: many_tables(spark, work / "b", args.tables)}
    result = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    try:
        for name, run in runs.items():
            if args.only in (None, name):
                result[name] = {**run(), "date": time.strftime("%Y-%m-%d")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.pop("date", None)
    save_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
