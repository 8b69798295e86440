"""Who should commit a silver table: delta-rs or Spark MERGE (cdcflow.cdc.apply.silver_writer).

Two measurements, each with both writers on the same input, written to results/silver_writer.json:

- `tables`: N synthetic tables, the streaming job's batch processor on two micro-batches of the same
  simulated history (batch 0 creates every table, batch 1 MERGEs into them); seconds per touched table.
- `size`: one table of R rows, a MERGE of C changes (updates of existing keys and inserts) through
  `apply.merge`, by table size: where Spark's distributed rewrite catches up with delta-rs.

    python -m benchmarks.silver_writer [--tables 100] [--events 3000] [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import save_result

RESULTS = Path(__file__).resolve().parent / "results" / "silver_writer.json"
REPO = Path(__file__).resolve().parent.parent


def _configs(work: Path, tables: int, writer: str) -> Path:
    from cdcflow.sim.synthetic import write_configs

    cfg = write_configs(REPO / "configs", work / f"configs-{writer}", tables)
    pipeline = cfg / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("defaults:\n", f"defaults:\n  writer: {writer}\n", 1))
    return cfg


def _project(work: Path, cfg: Path, name: str):
    from cdcflow.config import load_project

    return load_project(cfg, env={**os.environ, "CDCFLOW_LAKE_ROOT": str(work / name / "lake"),
                                  "CDCFLOW_CHECKPOINT_ROOT": str(work / name / "ck")})


def tables_run(spark, work: Path, tables: int, events: int) -> dict:
    """Per-table cost of a micro-batch, by writer, on the same simulated batches."""
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions
    from streaming.processor import BatchProcessor
    from streaming.sources import from_replay

    out: dict = {"tables": tables + 4, "events": events}
    lines: list[str] | None = None
    for writer in ("delta-rs", "spark"):
        project = _project(work, _configs(work, tables, writer), writer)
        if lines is None:
            simulate(project, work / "sim", SimOptions(seed=5, gen=GenOptions(events=events)))
            lines = [x for f in sorted((work / "sim" / "kinesis").glob("*.jsonl"))
                     for x in f.read_text().splitlines() if x.strip()]
        half = len(lines) // 2
        proc = BatchProcessor(spark, project)
        per_batch = []
        for batch_id, part in enumerate((lines[:half], lines[half:])):
            raw = spark.createDataFrame([(x,) for x in part], "value string")
            started = time.perf_counter()
            outcomes = proc.process(from_replay(raw), batch_id)
            seconds = time.perf_counter() - started
            per_batch.append({"records": len(part), "tables_touched": len(outcomes), "seconds": round(seconds, 2),
                              "seconds_per_table": round(seconds / max(1, len(outcomes)), 3)})
        proc.pool.shutdown()
        out[writer] = per_batch
    return out


def size_run(spark, work: Path, rows: int, changes: int) -> dict:
    """One MERGE of `changes` into a table of `rows`, by writer."""
    from pyspark.sql import functions as F

    from cdcflow.cdc import apply
    from cdcflow.cdc.changes import TableShape

    out: dict = {"rows": rows, "changes": changes}
    for writer in ("delta-rs", "spark"):
        project = _project(work, _configs(work, 0, writer), f"size-{writer}-{rows}")
        table = project.table("shop.products")
        shape = TableShape(table)
        path = project.path(table.delta_path)

        def batch(n: int, start: int, seq: str):
            return spark.range(start, start + n).select(
                F.col("id").alias("product_id"), F.concat(F.lit("SKU-"), F.col("id").cast("string")).alias("sku"),
                F.lit("name").alias("name"), F.lit("books").alias("category"),
                F.lit("9.99").cast("decimal(10,2)").alias("price"), F.lit(True).alias("active"),
                F.current_timestamp().alias("updated_at"), F.lit("insert").alias("_op"),
                F.concat(F.lit(seq), F.lpad(F.col("id").cast("string"), 12, "0")).alias("_seq"),
                F.current_timestamp().alias("_commit_ts"), F.lit("p").alias("_source_position"))

        apply.merge(spark, path, batch(rows, 0, "1"), shape)  # the table, written by the same writer
        # half updates of existing keys, half new keys
        started = time.perf_counter()
        applied = apply.merge(spark, path, batch(changes, rows - changes // 2, "2"), shape)
        out[writer] = {"seconds": round(time.perf_counter() - started, 3), "committed_by": applied.writer}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=100)
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--changes", type=int, default=1000)
    args = ap.parse_args()
    from cdcflow.runtime import get_spark

    spark = get_spark("cdcflow-bench-writer")
    work = Path(tempfile.mkdtemp(prefix="cdcflow-bench-writer-"))
    try:
        result = {"tables": tables_run(spark, work, args.tables, args.events),
                  "size": [size_run(spark, work, int(r), args.changes) for r in args.sizes.split(",") if r]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(RESULTS, result)


if __name__ == "__main__":
    main()
