"""`cdcflow simulate`: the subcommand's flags and handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from cdcflow.errors import UserError
from cdcflow.sim.s3 import LAYOUTS

FAULT_FLAGS = {  # flag -> FaultOptions field
    "duplicate-rate": "duplicate_rate",
    "out-of-order-rate": "out_of_order_rate",
    "late-rate": "late_rate",
    "malformed-json-rate": "malformed_json_rate",
    "missing-pk-rate": "missing_primary_key_rate",
    "unknown-table-rate": "unknown_table_rate",
    "type-mismatch-rate": "type_mismatch_rate",
    "no-ordering-rate": "no_ordering_rate",
}
SOURCE_FLAGS = {  # flag -> GenOptions field: real source changes, not delivery faults
    "schema-drift-rate": "schema_drift_rate",
    "pk-change-rate": "pk_change_rate",
    "null-update-rate": "null_update_rate",
    "partial-update-rate": "partial_update_rate",
    "dq-failure-rate": "dq_failure_rate",
    "dirty-value-rate": "dirty_value_rate",
    "drop-table-rate": "drop_table_rate",
    "same-key-in-txn-rate": "same_key_in_txn_rate",
}


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a rate between 0 and 1")
    return v


def _interval(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN-MAX milliseconds, e.g. 200-2000") from None
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= MIN <= MAX")
    return a, b


def register_simulate(sub: Any, commands: dict[str, Callable]) -> None:
    p = sub.add_parser(
        "simulate",
        help="generate a seeded source history and emit it as AWS DMS would (Kinesis JSON, S3 Parquet)",
        description="Simulate an OLTP source for the configured tables and emit DMS Kinesis records and DMS S3 "
        "Parquet files, with optional fault injection. Always writes --out (history.jsonl, kinesis/, s3/, "
        "manifest.json); --kinesis / --s3 also deliver to the configured stream / dms.raw_uri.",
    )
    p.add_argument("--seed", default="42", help="random seed; the same seed gives identical output (default 42)")
    p.add_argument("--events", type=int, default=None, help="CDC row changes to generate (default 200)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds: with --rate, events = rate x duration; alone, the source time span to generate")
    p.add_argument("--rate", type=float, default=None, help="Kinesis records per second (steady streaming load)")
    p.add_argument("--tables", type=int, default=0, help="add N synthetic tables synth.t0001... (up to 1000)")
    p.add_argument("--write-configs", default=None,
                   help="with --tables: write the config folder (pipeline.yaml + tables/) here (default OUT/configs)")
    p.add_argument("--out", default=".cdcflow/sim", help="output folder (default .cdcflow/sim)")
    p.add_argument("--kinesis", action="store_true", help="put the records on the configured Kinesis stream")
    p.add_argument("--s3", action="store_true", help="upload the Parquet files to dms.raw_uri")
    p.add_argument("--partition-key", choices=["schema-table", "primary-key"], default="schema-table")
    p.add_argument("--before-image", action="store_true",
                   help="add a pk-only before-image to updates (implied by --pk-change-rate)")
    p.add_argument("--dms-type-naming", choices=["wire", "doc"], default="wire",
                   help="column types in control records: as DMS writes them to Kinesis (INT32, TIMESTAMP; "
                        "default) or as its data-type documentation names them (INT4, DATETIME)")
    g = p.add_argument_group("source model")
    g.add_argument("--load-rows", type=int, default=20, help="full-load rows per table (child tables x2)")
    g.add_argument("--synth-rows", type=int, default=3, help="full-load rows per synthetic table")
    g.add_argument("--change-interval-ms", type=_interval, default=(200, 2000),
                   help="source time between changes, MIN-MAX ms (default 200-2000)")
    g.add_argument("--hot-keys", type=int, default=3, help="hot keys per table (get half the updates/deletes)")
    g.add_argument("--table-skew", type=float, default=0.0, metavar="EXPONENT",
                   help="share of changes per table ~ 1/rank^EXPONENT (tables by sorted name): 0 = uniform "
                        "(default), 1.1 = a few hot tables and a long cold tail")
    f = p.add_argument_group("faults (each a rate between 0 and 1)")
    for flag in (*FAULT_FLAGS, *SOURCE_FLAGS):
        f.add_argument(f"--{flag}", type=_rate, default=0.0, metavar="RATE")
    s = p.add_argument_group("DMS S3 target settings")
    s.add_argument("--timestamp-column", default="dms_commit_ts", help="TimestampColumnName (default dms_commit_ts)")
    s.add_argument("--max-file-size-kb", type=int, default=1_048_576, help="MaxFileSize for LOAD files (KB)")
    s.add_argument("--cdc-max-batch-interval", type=int, default=60, help="CdcMaxBatchInterval (seconds)")
    s.add_argument("--cdc-min-file-size-kb", type=int, default=32_000, help="CdcMinFileSize (KB)")
    s.add_argument("--include-op-for-full-load", action="store_true", help="IncludeOpForFullLoad")
    s.add_argument("--s3-layout", choices=LAYOUTS, default=LAYOUTS[0],
                   help="ordering columns in the files: $AR_H_CHANGE_SEQ (a transformation rule) and the "
                        "timestamp column (default), the timestamp column only, or neither (DMS's defaults)")
    commands["simulate"] = run_simulate


def options_from_args(args: argparse.Namespace, watermark_minutes: int) -> Any:
    from cdcflow.sim.faults import FaultOptions
    from cdcflow.sim.run import SimOptions
    from cdcflow.sim.s3 import S3Options
    from cdcflow.sim.source import GenOptions

    if args.events is not None and args.events < 0:
        raise UserError("--events must be >= 0")
    if args.rate is not None and args.rate <= 0:
        raise UserError("--rate must be > 0")
    if args.duration is not None and args.duration <= 0:
        raise UserError("--duration must be > 0")
    if args.events is not None and args.duration is not None:
        raise UserError("give --events or --duration, not both")
    if min(args.load_rows, args.synth_rows, args.hot_keys) < 0:
        raise UserError("--load-rows, --synth-rows and --hot-keys must be >= 0")
    if args.table_skew < 0:
        raise UserError("--table-skew must be >= 0")
    if min(args.max_file_size_kb, args.cdc_max_batch_interval, args.cdc_min_file_size_kb) <= 0:
        raise UserError("S3 batching settings must be > 0")
    events, duration = args.events, args.duration
    if duration is not None and args.rate:
        events, duration = int(args.rate * duration), None
    elif events is None and duration is None:
        events = 200
    gen = GenOptions(events=events, duration_s=duration, load_rows=args.load_rows, synth_rows=args.synth_rows,
                     change_interval_ms=args.change_interval_ms, hot_keys=args.hot_keys, table_skew=args.table_skew,
                     **{field: getattr(args, flag.replace("-", "_")) for flag, field in SOURCE_FLAGS.items()})
    faults = FaultOptions(watermark_minutes=watermark_minutes,
                          **{field: getattr(args, flag.replace("-", "_")) for flag, field in FAULT_FLAGS.items()})
    s3 = S3Options(timestamp_column=args.timestamp_column, max_file_size_kb=args.max_file_size_kb,
                   cdc_max_batch_interval_s=args.cdc_max_batch_interval,
                   cdc_min_file_size_kb=args.cdc_min_file_size_kb,
                   include_op_for_full_load=args.include_op_for_full_load, layout=args.s3_layout)
    seed: int | str = int(args.seed) if str(args.seed).lstrip("-").isdigit() else args.seed
    return SimOptions(seed=seed, gen=gen, faults=faults, s3=s3, partition_key_type=args.partition_key,
                      before_image=args.before_image, dms_type_naming=args.dms_type_naming,
                      send_kinesis=args.kinesis, upload_s3=args.s3, rate=args.rate)


def run_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.progress import Progress

    from cdcflow.cli import console
    from cdcflow.config import load_project
    from cdcflow.sim.run import simulate
    from cdcflow.sim.synthetic import MAX_TABLES, write_configs

    if not 0 <= args.tables <= MAX_TABLES:
        raise UserError(f"--tables must be between 0 and {MAX_TABLES}")
    project = load_project(args.config)
    config_dir = Path(args.config)
    if args.tables:
        config_dir = Path(args.write_configs or Path(args.out) / "configs")
        write_configs(args.config, config_dir, args.tables, project.pipeline.tables_dir)
        project = load_project(config_dir)
    opts = options_from_args(args, project.pipeline.streaming.watermark_minutes)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("sending to Kinesis" if opts.send_kinesis else "simulating", total=None)
        result = simulate(project, args.out, opts, config_dir, progress=lambda n: bar.advance(task, n))
    m = result.manifest
    faults = m["faults"]
    console.print(
        f"[green]ok[/green] {m['counts']['changes']} source changes for {len(project.tables)} tables (seed {opts.seed}) "
        f"in {result.seconds:.2f}s -> {args.out}: {m['counts']['kinesis_records']} Kinesis records, "
        f"{m['counts']['s3_files']} Parquet files, {len(faults['kinesis'])}/{len(faults['s3'])} faults (kinesis/s3)"
    )
    if args.tables:
        console.print(f"table configs: {config_dir} (use --config {config_dir} for the pipeline and verify)")
    if opts.send_kinesis:
        console.print(f"sent {m['kinesis'].get('sent', 0)} records to {m['kinesis'].get('stream')}")
    if opts.upload_s3:
        console.print(f"uploaded {m['counts']['s3_files']} files to {m['s3'].get('uri')}")
    return 0
