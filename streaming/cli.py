"""`cdcflow stream`: run the streaming job locally (Kinesis through the emulator, or replay files)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cdcflow.errors import UserError


def register_stream(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("stream", help="consume DMS CDC (Kinesis or replay files) and apply it to Delta tables")
    p.add_argument("--until-caught-up", action="store_true", help="process what is available, then stop")
    p.add_argument("--replay", metavar="PATH", help="read DMS Kinesis JSON-lines files, or a raw archive (gzip JSON lines, "
                                                    "a local folder or s3://), instead of Kinesis")
    p.add_argument("--files-per-batch", type=int, default=1, help="replay: files per micro-batch")
    p.add_argument("--trigger-seconds", type=int, help="micro-batch interval (default: streaming.trigger_seconds)")
    p.add_argument("--metrics-file", help="write EMF metric lines here instead of stdout")
    commands["stream"] = run_stream_command


def run_stream_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.markup import escape

    from cdcflow.cdc.quarantine import by_rule
    from cdcflow.cli import console, print_table
    from cdcflow.config import load_project
    from cdcflow.metrics import MetricsSink
    from cdcflow.runtime import get_spark
    from streaming.job import checkpoint_location, run_stream
    from streaming.sources import kinesis_stream, replay_stream

    project = load_project(args.config)
    # Before Spark starts, so a missing path, bucket, stream or stack is one line
    from cdcflow.aws import require_lake

    require_lake(project)
    local = args.replay
    if args.replay and args.replay.startswith(("s3://", "s3a://")):
        from cdcflow.archive.replay import stage_s3_replay

        local = str(stage_s3_replay(project, args.replay))
    elif args.replay and not Path(args.replay).exists():
        raise UserError(f"replay path {args.replay} does not exist")
    elif not args.replay:
        from cdcflow.aws import require_stream

        require_stream(project)
    spark = get_spark("cdcflow-stream", shuffle_partitions=project.pipeline.spark.shuffle_partitions,
                      driver_memory=project.pipeline.spark.driver_memory)
    metrics = MetricsSink(project.pipeline.name, path=args.metrics_file)
    if args.replay:
        source = replay_stream(spark, str(Path(local).resolve()), args.files_per_batch)
        ck = checkpoint_location(project, "replay")
    else:
        source = kinesis_stream(spark, project, checkpoint_location(project), args.metrics_file)
        ck = checkpoint_location(project)
    console.print(f"streaming from {'replay ' + args.replay if args.replay else 'Kinesis ' + project.pipeline.kinesis.stream}"
                  f" -> {project.lake_root} (checkpoint {ck})")
    summary = run_stream(
        spark, project, source,
        until_caught_up=args.until_caught_up,
        available_now=bool(args.replay) and args.until_caught_up,
        trigger_seconds=args.trigger_seconds,
        checkpoint=ck,
        metrics=metrics,
    )  # fmt: skip
    rows = [[t.table, t.read, t.applied, by_rule(summary.quarantined_by_rule.get(t.table, {})), t.late, t.duplicates,
             "yes" if t.isolated else ""]
            for t in sorted(summary.tables.values(), key=lambda t: t.table)]
    print_table(f"stream: {summary.batches} batches", ["table", "read", "applied", "quarantined", "late",
                                                        "duplicates", "isolated"], rows)
    dq_rows = [[t["table"], t["checked"], r["rule"], r["severity"], r["failed"], r["quarantined"]]
               for t in summary.dq for r in t["rules"] if r["failed"] or r["quarantined"]]
    if dq_rows:
        print_table("data quality (raw_to_staging)", ["table", "checked", "rule", "severity", "failed", "quarantined"],
                    dq_rows)
    for path in summary.dq_reports:
        console.print(f"DQ report: {path}")
    for t in sorted(summary.tables.values(), key=lambda t: t.table):
        if t.reload_warning:
            console.print(f"[yellow]{t.table}: {escape(t.reload_warning)}[/yellow]")
        for w in t.schema_warnings:
            console.print(f"[yellow]{t.table}: schema change read with a warning: {escape(str(w))}[/yellow]")
    return 0
