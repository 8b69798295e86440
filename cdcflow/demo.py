"""`make demo`: validate configs, start the embedded stack, simulate DMS CDC into Kinesis, run the
streaming job until it has caught up, verify the Delta tables against the oracle, print a summary."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from cdcflow import localstack
from cdcflow.cli import console, print_table
from cdcflow.config import load_project
from cdcflow.errors import UserError


def _step(name: str) -> float:
    console.rule(f"[bold]{name}")
    return time.perf_counter()


def run_demo(config_dir: str, workdir: str, events: int = 600) -> int:
    work = Path(workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    summary: list[list] = []

    t = _step("1. local stack up (moto server + embedded Postgres)")
    state = localstack.up()
    os.environ.update(localstack.stack_env())
    os.environ["CDCFLOW_LAKE_ROOT"] = str(work / "lake")
    os.environ["CDCFLOW_CHECKPOINT_ROOT"] = str(work / "checkpoints")
    os.environ["CDCFLOW_STREAM"] = f"cdcflow-demo-{int(time.time())}"  # a fresh stream per demo run
    summary.append(["local stack", f"moto pid {state['moto']['pid']}, postgres pid {state['postgres']['pid']}",
                    f"{time.perf_counter() - t:.1f}s"])

    t = _step("2. validate configs and create the stream")
    project = load_project(config_dir)
    from cdcflow.aws import bootstrap

    resources = bootstrap(project)
    summary.append(["validate", f"{len(project.tables)} tables; {', '.join(resources)}", f"{time.perf_counter() - t:.1f}s"])

    t = _step("3. simulate DMS CDC (with faults) into Kinesis")
    from cdcflow.sim.faults import FaultOptions
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions

    faults = FaultOptions(duplicate_rate=0.03, out_of_order_rate=0.05, late_rate=0.01, malformed_json_rate=0.005,
                          missing_primary_key_rate=0.005, unknown_table_rate=0.005, type_mismatch_rate=0.005)
    gen = GenOptions(events=events, pk_change_rate=0.02, dq_failure_rate=0.01, schema_drift_rate=1.0)
    sim = simulate(project, work / "sim", SimOptions(seed=42, gen=gen, faults=faults, send_kinesis=True),
                   config_dir=config_dir)
    summary.append(["simulate", f"{len(sim.kinesis)} DMS records -> Kinesis {project.pipeline.kinesis.stream}",
                    f"{time.perf_counter() - t:.1f}s"])

    t = _step("4. streaming job: Kinesis -> bronze / silver / quarantine Delta tables")
    from cdcflow.metrics import MetricsSink
    from cdcflow.runtime import get_spark
    from streaming.job import checkpoint_location, run_stream
    from streaming.sources import kinesis_stream

    spark = get_spark("cdcflow-demo")
    metrics_file = work / "metrics.jsonl"
    ck = checkpoint_location(project)
    result = run_stream(spark, project, kinesis_stream(spark, project, ck, str(metrics_file)), until_caught_up=True,
                        trigger_seconds=1, checkpoint=ck, metrics=MetricsSink(project.pipeline.name, path=str(metrics_file)))
    summary.append(["stream", f"{result.batches} batches, {result.rows_read} rows read, {result.rows_applied} applied, "
                    f"{result.rows_quarantined} quarantined", f"{time.perf_counter() - t:.1f}s"])
    rows = [[o.table, o.read, o.applied, o.quarantined, o.late, o.duplicates]
            for o in sorted(result.tables.values(), key=lambda o: o.table)]
    print_table("per table", ["table", "read", "applied", "quarantined", "late", "duplicates"], rows)

    t = _step("5. verify the Delta tables against the oracle")
    from cdcflow.oracle import build_oracle, load_history, resolve_salt
    from cdcflow.verify import print_summary, read_actual, verify

    oracle = build_oracle(project, load_history(work / "sim"), resolve_salt(project), "kinesis")
    diffs = verify(project, oracle, read_actual(project, spark))
    print_summary(diffs, console)
    ok = all(d.ok for d in diffs)
    summary.append(["verify", "silver + quarantine match the oracle" if ok else "DIFFERENCES (see above)",
                    f"{time.perf_counter() - t:.1f}s"])

    print_table("cdcflow demo summary", ["step", "result", "time"], summary)
    console.print(f"Lake: {work / 'lake'}   metrics (CloudWatch EMF): {metrics_file}")
    console.print("Stop the embedded stack with: cdcflow local down")
    if not ok:
        raise UserError("the demo's Delta tables differ from the oracle")
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
