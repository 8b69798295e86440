"""Benchmark: `cdcflow compact` over many small silver tables, as the scheduled compaction job runs it.

    python -m benchmarks.compaction [--tables 16] [--batches 4] [--events 3000]

Streams a simulated history of the sample tables plus N synthetic ones into a scratch lake in a few
micro-batches (several files per table), then times `compact` (tombstone GC, OPTIMIZE / Z-ORDER,
VACUUM per table, then bronze and quarantine) twice: with Spark's default folder-listing
parallelism for VACUUM (10,000 tasks) and with `compact`'s (one task per core). The
second pass runs on a fresh copy of the lake, so both do the same work. Writes
benchmarks/results/compaction.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import save_result
from benchmarks.streaming import REPO, _project, _simulate, _split

RESULTS = REPO / "benchmarks" / "results" / "compaction.json"


def _build_lake(spark, work: Path, tables: int, events: int, batches: int):
    from cdcflow.sim.synthetic import write_configs
    from streaming.processor import BatchProcessor
    from streaming.sources import from_replay

    config_dir = write_configs(REPO / "configs", work / "configs", tables)
    project = _project(work, config_dir)
    _simulate(project, work / "sim", events, config_dir, tables)
    proc = BatchProcessor(spark, project)
    for i, chunk in enumerate(_split(work / "sim", work / "replay", batches)):
        proc.process(from_replay(spark.createDataFrame([(x,) for x in chunk], "value string")), i)
    proc.pool.shutdown()
    return config_dir


def _timed_compact(spark, project, listing_tasks: int | None) -> dict:
    import batch.compaction as compaction

    ours = compaction.vacuum_listing_tasks
    if listing_tasks:
        compaction.vacuum_listing_tasks = lambda spark: listing_tasks
    try:
        start = time.perf_counter()
        results = compaction.compact(spark, project)
        seconds = time.perf_counter() - start
    finally:
        compaction.vacuum_listing_tasks = ours
    return {
        "seconds": round(seconds, 1),
        "seconds_per_table": round(seconds / len(results), 2),
        "files_before": sum(r.files_before for r in results),
        "files_after": sum(r.files_after for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    from cdcflow.runtime import get_spark

    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=16, help="synthetic tables beside the 4 sample ones")
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args(argv)
    spark = get_spark("cdcflow-bench-compaction")
    work = Path(tempfile.mkdtemp(prefix="cdcflow-bench-compaction-"))
    try:
        config_dir = _build_lake(spark, work, args.tables, args.events, args.batches)
        shutil.copytree(work / "lake", work / "lake-copy")
        project = _project(work, config_dir)
        default = _timed_compact(spark, project, listing_tasks=10000)
        shutil.rmtree(work / "lake")
        shutil.move(work / "lake-copy", work / "lake")
        ours = _timed_compact(spark, project, listing_tasks=None)
        tables = len(project.tables) + 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "tables": tables,
        "note": "silver tables + bronze + quarantine; tombstone GC, OPTIMIZE / Z-ORDER, VACUUM (168 h) each",
        "vacuum_listing_spark_default_10000": default,
        "vacuum_listing_one_task_per_core": ours,
        "speedup": round(default["seconds"] / ours["seconds"], 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    save_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
