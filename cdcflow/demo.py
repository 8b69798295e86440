"""`make demo`: the whole product on the embedded stack (moto server + embedded Postgres), in a few minutes.

1. start the stack; a fresh lake, checkpoints, Kinesis stream, raw S3 prefix and warehouse schema per run
2. simulate DMS with faults: the full load as LOAD Parquet files in S3, the ongoing changes on Kinesis
   (the usual DMS split: the stream carries no load records)
3. `full-load` (S3 -> bronze / silver / quarantine)
4. `stream` until caught up (Kinesis -> bronze / silver / quarantine)
5. `warehouse-merge` (bronze -> SCD2 dimensions and facts in Postgres)
6. `compact`
7. `verify` silver, quarantine and the warehouse SCD2 history against the simulator's oracle
8. `status`, the summary, and one dimension key's SCD2 history

Each step calls what its CLI command calls. Spark and JVM output goes to `<workdir>/spark.log`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cdcflow import localstack
from cdcflow.cli import console, print_table
from cdcflow.config import Project, load_project
from cdcflow.errors import UserError

# The demo's own warehouse schema: dropped and rebuilt each run, like its lake (the warehouse
# watermarks are bronze batch ids, which restart with a fresh lake).
DEMO_SCHEMA = "cdcflow_demo"
# 400 source changes: ~490 Kinesis records after faults, 4 tables x 20-40 load rows in S3. Enough for
# every fault kind and several SCD2 versions per hot key; small enough for 3 minutes on 2 cores.
DEMO_EVENTS = 400


@dataclasses.dataclass
class StepResult:
    step: str
    result: str
    seconds: float


class Steps:
    """Runs the numbered steps, timing each, and keeps the summary rows."""

    def __init__(self) -> None:
        self.rows: list[StepResult] = []
        self.started = time.perf_counter()

    @contextmanager
    def step(self, title: str) -> Iterator[dict[str, str]]:
        console.rule(f"[bold]{len(self.rows) + 1}. {title}")
        out: dict[str, str] = {"result": ""}
        t = time.perf_counter()
        yield out
        self.rows.append(StepResult(title.split(":")[0], out["result"], time.perf_counter() - t))

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


def render_summary(rows: list[StepResult], total: float) -> None:
    print_table(f"cdcflow demo summary ({total:.0f} s)", ["step", "result", "time"],
                [[r.step, r.result, f"{r.seconds:.1f}s"] for r in rows])


def demo_project(config_dir: str) -> Project:
    """The configs with the demo's warehouse schema (configs are frozen: a copy with it replaced)."""
    project = load_project(config_dir)
    wh = project.pipeline.warehouse.model_copy(update={"schema_": DEMO_SCHEMA})
    return dataclasses.replace(project, pipeline=project.pipeline.model_copy(update={"warehouse": wh}))


def deliver(project: Project, sim: Any) -> tuple[int, int]:
    """DMS's usual split: the LOAD files to dms.raw_uri (S3), the changes without load records to
    Kinesis. Returns (files uploaded, records put)."""
    from cdcflow.aws import ensure_bucket, ensure_stream, project_client, split_s3
    from cdcflow.sim.kinesis import send
    from cdcflow.sim.s3 import upload

    loads = {rel: data for rel, data in sim.s3_files.items() if rel.rsplit("/", 1)[-1].startswith("LOAD")}
    bucket, prefix = split_s3(project.pipeline.dms.raw_uri)
    s3 = project_client(project, "s3")
    ensure_bucket(s3, bucket)
    upload(s3, bucket, prefix, loads)
    k = project_client(project, "kinesis")
    ensure_stream(k, project.pipeline.kinesis.stream, project.pipeline.kinesis.shards)
    cdc = [r for r in sim.kinesis if r.op != "load"]
    return len(loads), send(k, project.pipeline.kinesis.stream, cdc)


def scd2_history(project: Project, url: str, limit: int = 8) -> tuple[str, str, list[str], list[tuple]] | None:
    """The SCD2 dimension key with the most versions: (table, key value, columns, version rows)."""
    import psycopg

    from batch.warehouse.ddl import model, q
    from cdcflow.oracle import scd2_tables

    best = None
    with psycopg.connect(url) as conn:
        for t in scd2_tables(project):
            m = model(project, t.name)
            if not conn.execute("select to_regclass(%s)", (f"{q(m.schema)}.{q(m.target_name)}",)).fetchone()[0]:
                continue
            key = ", ".join(q(c) for c in m.key)
            row = conn.execute(f"select {key}, count(*) from {m.dim} where not coalesce(is_inferred, false) "
                               f"group by {key} order by count(*) desc, {key} limit 1").fetchone()
            if row and (best is None or row[-1] > best[2]):
                best = (m, row[:-1], row[-1])
        if best is None:
            return None
        m, key_values, _ = best
        cols = [*m.key, *m.tracked[:4], "valid_from", "valid_to", "is_current", "is_deleted"]
        where = " and ".join(f"{q(c)} = %s" for c in m.key)
        rows = conn.execute(f"select {', '.join(q(c) for c in cols)} from {m.dim} where {where} "
                            f"order by valid_from, _seq limit {limit}", key_values).fetchall()
    return m.table.name, ", ".join(map(str, key_values)), cols, rows


def render_history(history: tuple[str, str, list[str], list[tuple]] | None) -> None:
    from batch.warehouse.ddl import LOW_TS

    if history is None:
        console.print("no SCD2 dimension rows in the warehouse")
        return
    table, key, cols, rows = history

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        text = str(v)
        if text.startswith(LOW_TS[:10]):
            return "(full load)"
        return text if len(text) <= 18 else text[:15] + "..."

    print_table(f"SCD2 history of {table}, key {key}: {len(rows)} versions", cols,
                [[cell(v) for v in r] for r in rows])


def _stack(work: Path) -> dict:
    """Start (or reuse) the embedded stack and point this process's configs at it, with fresh names."""
    state = localstack.up()
    os.environ.update(localstack.stack_env())
    run = int(time.time())
    os.environ["CDCFLOW_LAKE_ROOT"] = str(work / "lake")
    os.environ["CDCFLOW_CHECKPOINT_ROOT"] = str(work / "checkpoints")
    os.environ["CDCFLOW_STREAM"] = f"cdcflow-demo-{run}"
    os.environ["CDCFLOW_RAW_URI"] = f"s3://cdcflow-raw/demo-{run}/dms"
    os.environ["CDCFLOW_SPARK_LOG"] = str(work / "spark.log")
    return state


def run_demo(config_dir: str, workdir: str, events: int = DEMO_EVENTS) -> int:
    work = Path(workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    steps = Steps()
    metrics_file = work / "metrics.jsonl"

    with steps.step("local stack: moto server + embedded Postgres") as s:
        state = _stack(work)
        project = demo_project(config_dir)
        url = project.pipeline.warehouse.url or ""
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'drop schema if exists "{DEMO_SCHEMA}" cascade')
        s["result"] = (f"moto {state['moto']['endpoint']}, Postgres pid {state['postgres']['pid']}; "
                       f"{len(project.tables)} tables valid")
        console.print(f"Spark / JVM log: {work / 'spark.log'}")

    with steps.step("simulate DMS: full load to S3, CDC to Kinesis, with faults") as s:
        from cdcflow.sim.faults import FaultOptions
        from cdcflow.sim.run import SimOptions, simulate
        from cdcflow.sim.source import GenOptions

        faults = FaultOptions(duplicate_rate=0.03, out_of_order_rate=0.05, late_rate=0.01, malformed_json_rate=0.005,
                              missing_primary_key_rate=0.005, unknown_table_rate=0.005, type_mismatch_rate=0.005,
                              watermark_minutes=project.pipeline.streaming.watermark_minutes)
        gen = GenOptions(events=events, pk_change_rate=0.02, dq_failure_rate=0.01, schema_drift_rate=1.0)
        sim = simulate(project, work / "sim", SimOptions(seed=42, gen=gen, faults=faults), config_dir=config_dir)
        files, records = deliver(project, sim)
        kinds: dict[str, int] = {}
        for f in sim.manifest["faults"]["kinesis"]:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        s["result"] = (f"{len(sim.changes)} source changes: {files} LOAD files -> {project.pipeline.dms.raw_uri}, "
                       f"{records} records -> Kinesis; faults: "
                       + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        console.print(s["result"], soft_wrap=True)

    with steps.step("Spark session") as s:
        from cdcflow.runtime import get_spark

        spark = get_spark("cdcflow-demo", shuffle_partitions=project.pipeline.spark.shuffle_partitions,
                          driver_memory=project.pipeline.spark.driver_memory)
        s["result"] = f"Spark {spark.version} local[2]; log {work / 'spark.log'}"

    with steps.step("full-load: S3 LOAD files -> silver") as s:
        from rich.progress import Progress

        from batch.full_load import run_full_load

        with Progress(console=console, transient=True) as progress:
            loaded = run_full_load(spark, project, progress=progress)
        print_table("full load", list(loaded.COLUMNS), loaded.summary_rows())
        s["result"] = f"{loaded.files} files, {loaded.rows} rows, {loaded.quarantined} quarantined"

    with steps.step("stream: Kinesis -> bronze / silver / quarantine, until caught up") as s:
        from cdcflow.cdc.quarantine import by_rule
        from cdcflow.metrics import MetricsSink
        from streaming.job import checkpoint_location, run_stream
        from streaming.sources import kinesis_stream

        ck = checkpoint_location(project)
        result = run_stream(spark, project, kinesis_stream(spark, project, ck, str(metrics_file)), until_caught_up=True,
                            trigger_seconds=1, checkpoint=ck, idle_batches_to_stop=1,
                            metrics=MetricsSink(project.pipeline.name, path=str(metrics_file)))
        print_table(f"stream: {result.batches} micro-batches", ["table", "read", "applied", "quarantined", "late",
                                                                "duplicates"],
                    [[o.table, o.read, o.applied, by_rule(result.quarantined_by_rule.get(o.table, {})), o.late,
                      o.duplicates] for o in sorted(result.tables.values(), key=lambda o: o.table)])
        s["result"] = (f"{result.batches} micro-batches, {result.rows_read} records read, {result.rows_applied} "
                       f"applied, {result.rows_quarantined} quarantined")

    with steps.step("warehouse-merge: bronze -> SCD2 dimensions and facts (Postgres)") as s:
        from batch.warehouse_job import merge_from_lake, summary_rows
        from cdcflow.metrics import MetricsSink

        run = merge_from_lake(spark, project, url, metrics=MetricsSink(project.pipeline.name, path=str(metrics_file)))
        print_table(f"data quality, run {run.run_id}", ["table", "stage", "rows", "failures (rule, severity, rows)",
                                                        "quarantined", "merged"], summary_rows(run))
        if run.error:
            raise UserError(f"warehouse-merge failed: {run.error}")
        s["result"] = (f"{sum(t.staged for t in run.tables)} rows staged into {len(run.tables)} tables "
                       f"(schema {DEMO_SCHEMA}), {sum(t.quarantined for t in run.tables)} quarantined")

    with steps.step("compact: OPTIMIZE / Z-ORDER / VACUUM where needed") as s:
        from batch.cli import run_compaction
        from cdcflow.metrics import MetricsSink

        hours = project.pipeline.defaults.vacuum_min_retention_hours
        summary = run_compaction(spark, project, None, hours, False,
                                 MetricsSink(project.pipeline.name, path=str(metrics_file)), console.print)
        s["result"] = (f"{summary['tables_compacted']} compacted, {summary['tables_skipped']} healthy, "
                       f"{summary['files_removed']} files removed")

    with steps.step("verify: silver, quarantine and warehouse SCD2 vs the oracle") as s:
        from cdcflow.oracle import build_oracle, load_history, resolve_salt
        from cdcflow.verify import print_summary, read_actual, verify

        oracle = build_oracle(project, load_history(work / "sim"), resolve_salt(project), "kinesis")
        diffs = verify(project, oracle, read_actual(project, spark, warehouse=True))
        print_summary(diffs, console)
        ok = all(d.ok for d in diffs)
        s["result"] = (f"[green]ok[/green]: {len(diffs)} checks match" if ok
                       else f"[red]DIFFERENCES[/red] in {sum(not d.ok for d in diffs)} of {len(diffs)} checks")

    from cdcflow.runtime import stop_spark

    stop_spark()
    with steps.step("status (`cdcflow status`, from the lake without Spark)") as s:
        from cdcflow.status import collect_status, render

        render(collect_status(project, metrics_file), console)
        s["result"] = "per-table rows, batches, freshness, quarantine; stream lag"

    console.rule("[bold]summary")
    render_summary(steps.rows, steps.total)
    render_history(scd2_history(project, url))
    console.print(f"Lake: {work / 'lake'}   metrics (CloudWatch EMF): {metrics_file}   Spark / JVM log: "
                  f"{work / 'spark.log'}", soft_wrap=True)
    console.print(f"Warehouse: {localstack.StackSettings.from_env().pg_url.replace(':cdcflow@', ':***@')} "
                  f"schema {DEMO_SCHEMA}", soft_wrap=True)
    console.print(f"Again: CDCFLOW_LAKE_ROOT={work / 'lake'} CDCFLOW_CHECKPOINT_ROOT={work / 'checkpoints'} "
                  f"cdcflow status --metrics-file {metrics_file}", soft_wrap=True)
    console.print("Stop the embedded stack with: cdcflow local down")
    if not ok:
        raise UserError("the demo's tables differ from the oracle (see verify above)")
    return 0


def spark_delta_smoke(path: str) -> int:
    """Write a Delta table, MERGE an update + insert + delete into it, and read it back."""
    from delta.tables import DeltaTable

    from cdcflow.runtime import get_spark

    spark = get_spark("cdcflow-demo")
    spark.createDataFrame([(1, "a"), (2, "b"), (3, "c")], "id bigint, v string").write.format("delta").mode(
        "overwrite"
    ).save(path)
    changes = spark.createDataFrame([(2, "B", "U"), (3, None, "D"), (4, "d", "I")], "id bigint, v string, op string")
    (
        DeltaTable.forPath(spark, path)
        .alias("t")
        .merge(changes.alias("s"), "t.id = s.id")
        .whenMatchedDelete("s.op = 'D'")
        .whenMatchedUpdate(set={"v": "s.v"})
        .whenNotMatchedInsert("s.op != 'D'", values={"id": "s.id", "v": "s.v"})
        .execute()
    )
    got = sorted(tuple(r) for r in spark.read.format("delta").load(path).collect())
    if got != [(1, "a"), (2, "B"), (4, "d")]:
        raise AssertionError(f"Delta MERGE smoke run produced {got}")
    return len(got)
