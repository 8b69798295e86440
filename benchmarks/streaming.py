"""Streaming benchmark: sustained events/s and freshness, ours vs the canonical Delta docs pattern.

    python -m benchmarks.streaming [--events 20000] [--batches 8] [--tables 0] [--kinesis-rate 500 --kinesis-seconds 60]

1. Throughput (replay source, 4 sample tables, or --tables N synthetic ones): the same DMS records,
   with duplicates / out-of-order / late delivery, through (a) cdcflow's processor and (b) the
   canonical pattern from the Delta docs: foreachBatch + dedupe per key + plain MERGE, no ordering
   guard. Reports events/s for both, their ratio, and whether each result verifies against the oracle.
2. Sustained (replay source, a steady arrival rate on the wall clock, 5 s trigger): whether the job
   keeps up, and p50 / p95 freshness (arrival -> the record's table committed to silver). On the
   sample tables at 5,000 events/s (`--only sustained`), and on 1000 synthetic tables plus the sample
   ones (`--only tables-sustained --tables 1000`, 20 events/s by default).
3. Freshness (Kinesis on the moto server): records put at a steady rate while the job runs with a
   5 s trigger; freshness = Kinesis arrival -> visible in silver (`_ingested_at`), p50 / p95.
Results: benchmarks/results/streaming.json. Numbers from a shared 2-core machine are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from benchmarks import save_result

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
REPO = Path(__file__).resolve().parent.parent


def _project(work: Path, config_dir: Path, **env: str):
    from cdcflow.config import load_project

    return load_project(config_dir, env={**os.environ, "CDCFLOW_LAKE_ROOT": str(work / "lake"),
                                         "CDCFLOW_CHECKPOINT_ROOT": str(work / "ck"), **env})  # fmt: skip


def _simulate(project, out: Path, events: int, config_dir: Path, tables: int):
    from cdcflow.sim.faults import FaultOptions
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions

    faults = FaultOptions(duplicate_rate=0.03, out_of_order_rate=0.1, late_rate=0.05)
    return simulate(project, out, SimOptions(seed=11, gen=GenOptions(events=events), faults=faults),
                    config_dir=config_dir)


def _split(sim: Path, dest: Path, batches: int) -> list[list[str]]:
    lines = [x for f in sorted((sim / "kinesis").glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]
    size = -(-len(lines) // batches)
    return [lines[i * size:(i + 1) * size] for i in range(batches)]


def canonical_batch(spark: SparkSession, project, raw: DataFrame) -> None:
    """The Delta docs pattern: parse, keep one row per key (latest in the batch), plain MERGE."""
    from delta.tables import DeltaTable

    from cdcflow.cdc.envelope import parse_kinesis_json
    from cdcflow.cdc.masking import mask_column, pii_salt

    salt = pii_salt(project)  # same masking as ours: the comparison is about ordering, not PII

    norm = parse_kinesis_json(raw, sorted(project.tables)).filter("_problem IS NULL AND _record_type = 'data'")
    norm = norm.persist()
    for name in [r[0] for r in norm.select("_table").distinct().collect()]:
        t = project.table(name)
        cols = [c for c in t.columns if t.pii.get(c) != "drop"]
        df = norm.filter(F.col("_table") == name).select(
            *[(mask_column(F.col("_data")[c], t.pii[c], salt) if c in t.pii else F.col("_data")[c].cast(ty)).alias(c)
              for c, ty in t.columns.items() if c in cols],
            F.col("_op"), F.col("_commit_ts"))  # fmt: skip
        w = Window.partitionBy(*t.primary_key).orderBy(F.col("_commit_ts").desc_nulls_last())
        df = df.withColumn("_rn", F.row_number().over(w)).filter("_rn = 1").drop("_rn")
        path = project.path("canonical/" + t.delta_path)
        if not DeltaTable.isDeltaTable(spark, path):
            df.filter("_op != 'delete'").drop("_op", "_commit_ts").write.format("delta").save(path)
            continue
        cond = " AND ".join(f"t.{k} = s.{k}" for k in t.primary_key)
        (DeltaTable.forPath(spark, path).alias("t").merge(df.alias("s"), cond)
         .whenMatchedDelete("s._op = 'delete'")
         .whenMatchedUpdate(set={c: f"s.{c}" for c in cols})
         .whenNotMatchedInsert("s._op != 'delete'", values={c: f"s.{c}" for c in cols})
         .execute())  # fmt: skip
    norm.unpersist()


def _verify(spark, project, sim: Path, prefix: str = "") -> bool:
    from cdcflow.actual import read_silver
    from cdcflow.oracle import build_oracle, load_history, resolve_salt
    from cdcflow.runtime import forget_delta_table
    from cdcflow.verify import compare_current

    oracle = build_oracle(project, load_history(sim), resolve_salt(project))
    if not prefix:
        current = read_silver(spark, project)
    else:  # the canonical tables hold live rows only: present them as such
        current = {}
        for name, t in project.tables.items():
            path = project.path(prefix + t.delta_path)
            try:
                rows = spark.read.format("delta").load(path).collect()
            except Exception:  # noqa: BLE001 - a table never written
                rows = []
            finally:
                forget_delta_table(spark, path)  # as cdcflow.actual.read_silver does
            current[name] = [{**r.asDict(), "_is_deleted": False} for r in rows]
    oks = []
    for name, t in project.tables.items():
        expected = {k: v for k, v in oracle.state.get(name, {}).items() if not (prefix and v.get("_is_deleted"))}
        oks.append(compare_current(expected, current.get(name, []), t).ok)
    return all(oks)


def throughput(spark, events: int, batches: int, tables: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cdcflow-bench-") as work:  # removed even when a run fails
        return _throughput(spark, Path(work), events, batches, tables)


def _throughput(spark, work: Path, events: int, batches: int, tables: int) -> dict:
    from streaming.processor import BatchProcessor
    from streaming.sources import from_replay

    config_dir = REPO / "configs"
    if tables:
        from cdcflow.sim.synthetic import write_configs

        config_dir = write_configs(REPO / "configs", work / "configs", tables)
    project = _project(work, config_dir)
    _simulate(project, work / "sim", events, config_dir, tables)
    chunks = _split(work / "sim", work / "replay", batches)
    records = sum(len(c) for c in chunks)
    frames = [spark.createDataFrame([(x,) for x in c], "value string").persist() for c in chunks]
    for f in frames:
        f.count()

    proc = BatchProcessor(spark, project)
    start = time.perf_counter()
    for i, f in enumerate(frames):
        proc.process(from_replay(f), i)
    ours_s = time.perf_counter() - start
    ours_ok = _verify(spark, project, work / "sim")

    start = time.perf_counter()
    for f in frames:
        canonical_batch(spark, project, from_replay(f))
    canon_s = time.perf_counter() - start
    canon_ok = _verify(spark, project, work / "sim", prefix="canonical/")
    return {
        "tables": len(project.tables), "records": records, "batches": batches,
        "ours": {"seconds": round(ours_s, 2), "events_per_s": round(records / ours_s), "verifies": ours_ok},
        "canonical_foreachBatch_merge": {"seconds": round(canon_s, 2), "events_per_s": round(records / canon_s),
                                         "verifies": canon_ok},
        "throughput_ratio_ours_vs_canonical": round(canon_s / ours_s, 2),
    }  # fmt: skip


def _data_table(line: str) -> str | None:
    """The table (schema.table) of a DMS Kinesis data record; None for control or unparseable ones."""
    try:
        meta = json.loads(line).get("metadata", {})
    except ValueError:
        return None
    return f"{meta.get('schema-name')}.{meta.get('table-name')}" if meta.get("record-type") == "data" else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 of `values` (None when there are none)."""
    values = sorted(values)
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(values[len(values) // 2], 2), "p95": round(values[int(0.95 * len(values))], 2)}


def _processing_rate(batches: list[dict]) -> int:
    """Records per second of batch time, without the first and last batches (see keeps_up)."""
    steady = batches[1:-1] if len(batches) > 2 else batches
    return round(sum(b["records"] for b in steady) / sum(b["seconds"] for b in steady))


def _indexed_lines(spark: SparkSession, lines: list[str], path: Path) -> DataFrame:
    """(i, value) rows through a Parquet file: createDataFrame from a list ships the whole list in
    the driver's task data, which runs a 2 GB driver out of heap at a million lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"i": pa.array(range(len(lines)), pa.int64()), "value": lines}), path)
    return spark.read.parquet(str(path))


def sustained(spark, rate: int, seconds: int, trigger: float = 5.0, warmup_batches: int = 4, tables: int = 0) -> dict:
    """The sample tables (or `tables` synthetic ones as well) under a steady arrival rate, with a
    `trigger`-second processing-time trigger.

    Events "arrive" at `rate` per second on the wall clock (record i at i / rate s); each micro-batch
    takes every record that has arrived when it starts, as a Kinesis source with a large enough
    per-shard limit does. A batch starts `trigger` s after the previous start, or at once when the
    previous batch overran. The job sustains the rate when batch sizes stop growing.

    Freshness of a data record = the moment its table's MERGE committed in its micro-batch (visible
    in silver; cdcflow applies the touched tables in parallel) - its arrival; a record of a table
    that was not applied (isolated) counts at its batch's end. Control records arrive like the others
    but are not counted. The batch-end figure is reported too.

    First the same history is applied to a scratch lake in `warmup_batches` batches, not measured: a
    streaming job runs for days, and only its first batches pay for JIT and code generation."""
    with tempfile.TemporaryDirectory(prefix="cdcflow-sustained-") as work:  # removed even when a run fails
        return _sustained(spark, Path(work), rate, seconds, trigger, warmup_batches, tables)


def _sustained(spark, work: Path, rate: int, seconds: int, trigger: float, warmup_batches: int, tables: int) -> dict:
    from streaming.processor import BatchProcessor
    from streaming.sources import from_replay

    config_dir = REPO / "configs"
    if tables:
        from cdcflow.sim.synthetic import write_configs

        config_dir = write_configs(REPO / "configs", work / "configs", tables)
    project = _project(work, config_dir)
    _simulate(project, work / "sim", rate * seconds, config_dir, tables)
    lines = [x for c in _split(work / "sim", work / "replay", 1) for x in c]
    line_tables = [_data_table(x) for x in lines]
    allrecs = _indexed_lines(spark, lines, work / "lines.parquet").persist()
    allrecs.count()

    def records(first: int, end: int) -> DataFrame:
        return from_replay(allrecs.filter((F.col("i") >= first) & (F.col("i") < end)).select("value"))

    if warmup_batches:
        scratch = BatchProcessor(spark, _project(work / "warmup", config_dir))
        step = -(-len(lines) // warmup_batches)
        for b in range(warmup_batches):
            scratch.process(records(b * step, (b + 1) * step), b)

    proc = BatchProcessor(spark, project)
    t0 = time.time()
    start, done, batches, fresh, fresh_end = t0 + trigger, 0, [], [], []
    while done < len(lines):
        time.sleep(max(0.0, start - time.time()))
        began = time.time()
        arrived = min(len(lines), int((began - t0) * rate))
        outcomes = proc.process(records(done, arrived), len(batches))
        end = time.time()
        visible = {o.table: o.visible_at for o in outcomes if o.visible_at}
        for i in range(done, arrived):
            if line_tables[i] is None:
                continue  # control records (create-table at the stream's start) are not data changes
            arrival = t0 + i / rate
            fresh.append(visible.get(line_tables[i], end) - arrival)
            fresh_end.append(end - arrival)
        batches.append({"records": arrived - done, "tables": len(outcomes), "seconds": round(end - began, 2)})
        done = arrived
        start = max(start + trigger, end)
    total = time.time() - t0
    ok = _verify(spark, project, work / "sim")
    allrecs.unpersist()
    # A job that falls behind takes a bigger batch each time; one that keeps up settles. The first
    # batch is always rate x trigger and the last one only drains what is left: neither counts.
    steady = [b["records"] for b in batches[1:-1]]
    keeps_up = len(steady) >= 2 and steady[-1] <= 1.1 * steady[-2]
    return {
        "tables": len(project.tables), "rate": rate, "warmup_batches": warmup_batches,
        "arrival_seconds": round(len(lines) / rate),  # the simulator adds control records and faults
        "trigger_seconds": trigger,
        "records": len(lines), "seconds": round(total, 1),
        # while busy, over the same batches as keeps_up: what the job takes at these batch sizes
        "processing_events_per_s": _processing_rate(batches),
        "keeps_up": keeps_up, "verifies": ok,
        "batches": batches,
        "freshness_s": _percentiles(fresh),
        "freshness_definition": "data record arrival (record i at i / rate s) -> its table's MERGE committed to silver",
        "freshness_batch_end_s": _percentiles(fresh_end),
    }  # fmt: skip


def freshness(spark, rate: int, seconds: int) -> dict:
    import threading

    from cdcflow import localstack
    from cdcflow.aws import client, ensure_stream
    from cdcflow.sim.kinesis import send
    from streaming.job import checkpoint_location, run_stream
    from streaming.sources import kinesis_stream

    work = Path(tempfile.mkdtemp(prefix="cdcflow-fresh-"))
    settings = localstack.StackSettings(work / "stack", 5731, 5732)
    localstack.up(settings)
    try:
        stream = "bench-fresh"
        project = _project(work, REPO / "configs", CDCFLOW_AWS_ENDPOINT=settings.aws_endpoint, CDCFLOW_STREAM=stream)
        sim = _simulate(project, work / "sim", rate * seconds, REPO / "configs", 0)
        kinesis = client("kinesis", settings.aws_endpoint, "us-east-1")
        ensure_stream(kinesis, stream, 2)
        sender = threading.Thread(target=send, args=(kinesis, stream, sim.kinesis), kwargs={"rate": rate})
        ck = checkpoint_location(project)
        sender.start()
        started = time.perf_counter()
        summary = run_stream(spark, project, kinesis_stream(spark, project, ck), until_caught_up=True,
                             trigger_seconds=5, checkpoint=ck, idle_batches_to_stop=3)
        took = time.perf_counter() - started
        sender.join()
        bronze = spark.read.format("delta").load(project.path("bronze"))
        lat = []
        for t in project.tables.values():
            silver = spark.read.format("delta").load(project.path(t.delta_path))
            joined = silver.join(bronze.filter(F.col("table") == t.name).groupBy("commit_ts").agg(
                F.min("arrival_ts").alias("arrival")), silver["_commit_ts"] == F.col("commit_ts"))
            lat += [r[0] for r in joined.select(
                (F.unix_micros("_ingested_at") - F.unix_micros("arrival")) / 1e6).collect() if r[0] is not None]
        return {"rate_target": rate, "records": len(sim.kinesis), "seconds": round(took, 1),
                "events_per_s": round(summary.rows_read / took), "batches": summary.batches,
                "freshness_s": {**_percentiles(lat), "samples": len(lat)},
                "freshness_definition": "Kinesis arrival -> visible in silver (_ingested_at)"}  # fmt: skip
    finally:
        localstack.down(settings)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--backlog-events", type=int, default=100000,
                    help="also the sample tables in large micro-batches, as under a backlog (0 = skip)")
    ap.add_argument("--backlog-batches", type=int, default=4)
    ap.add_argument("--tables", type=int, default=0, help="also run with N synthetic tables (e.g. 1000)")
    ap.add_argument("--table-events", type=int, default=3000)
    ap.add_argument("--kinesis-rate", type=int, default=500)
    ap.add_argument("--kinesis-seconds", type=int, default=60)
    ap.add_argument("--sustained-rate", type=int, default=5000)
    ap.add_argument("--sustained-seconds", type=int, default=60)
    ap.add_argument("--sustained-warmup", type=int, default=4, help="batches on a scratch lake first, not measured")
    ap.add_argument("--tables-rate", type=int, default=20, help="tables-sustained: events/s over all tables")
    ap.add_argument("--tables-seconds", type=int, default=120, help="tables-sustained: seconds of arrivals")
    ap.add_argument("--only", choices=["sample", "backlog", "sustained", "kinesis", "tables", "tables-sustained"],
                    help="run one section (tables, tables-sustained: need --tables N); keep the others' last results")
    args = ap.parse_args()
    if args.only in ("tables", "tables-sustained") and not args.tables:
        ap.error(f"--only {args.only} needs --tables N")
    from cdcflow.runtime import get_spark

    spark = get_spark("cdcflow-bench")
    result = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    result["machine"] = f"{os.cpu_count()} cores"
    today = time.strftime("%Y-%m-%d")
    if args.only in (None, "sample"):
        result["sample_tables"] = {**throughput(spark, args.events, args.batches, 0), "date": today}
    if args.backlog_events and args.only in (None, "backlog"):
        # Sustained rate when the job is behind: Kinesis hands it large batches, so fixed costs amortize.
        result["sample_tables_backlog"] = {**throughput(spark, args.backlog_events, args.backlog_batches, 0),
                                           "date": today}
    if args.sustained_rate and args.only in (None, "sustained"):
        run = sustained(spark, args.sustained_rate, args.sustained_seconds, warmup_batches=args.sustained_warmup)
        # a longer run (silver grows, Delta checkpoints every 20 commits) is kept beside the default one
        default = args.sustained_seconds == ap.get_default("sustained_seconds")
        key = "sample_tables_sustained" + ("" if default else f"_{args.sustained_seconds}s")
        result[key] = {**run, "date": today}
    if args.tables and args.only == "tables-sustained":
        # No warm-up: one pass over 1000 tables' history costs about as much as the run itself.
        run = sustained(spark, args.tables_rate, args.tables_seconds, warmup_batches=0, tables=args.tables)
        result[f"synthetic_{args.tables}_tables_sustained"] = {**run, "date": today}
    if args.tables and args.only in (None, "tables"):
        result[f"synthetic_{args.tables}_tables"] = {**throughput(spark, args.table_events, 2, args.tables),
                                                     "date": today}
    if args.kinesis_rate and args.only in (None, "kinesis"):
        result["kinesis_freshness"] = {**freshness(spark, args.kinesis_rate, args.kinesis_seconds), "date": today}
    result["targets"] = {"events_per_s": 5000, "p95_freshness_s": 15}
    save_result(RESULTS, result)


if __name__ == "__main__":
    main()
