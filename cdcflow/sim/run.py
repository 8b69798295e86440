"""`cdcflow simulate`: generate a history, encode it as DMS output with faults, write / send it.

Output folder (docs/design.md): history.jsonl, kinesis/part-NNNNN.jsonl, s3/<schema>/<table>/..., manifest.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdcflow.config import Project
from cdcflow.oracle import expected_quarantine, failing_rule, op_counts
from cdcflow.sim.faults import FaultOptions, inject_kinesis
from cdcflow.sim.kinesis import BEFORE_IMAGE_FIELD, KinesisRecord, encode_history, send
from cdcflow.sim.s3 import CHANGE_SEQ_COLUMN, S3Options, S3Writer, upload, write_local
from cdcflow.sim.source import Change, GenOptions, generate_history

KINESIS_LINES_PER_FILE = 100_000


@dataclass
class SimOptions:
    seed: int | str = 42
    gen: GenOptions = field(default_factory=GenOptions)
    faults: FaultOptions = field(default_factory=FaultOptions)
    s3: S3Options = field(default_factory=S3Options)
    partition_key_type: str = "schema-table"
    before_image: bool = False  # pk-only before-image on updates (on automatically with pk changes)
    dms_type_naming: str = "wire"  # control records' column types: "wire" (as DMS sends them) or "doc"
    send_kinesis: bool = False
    upload_s3: bool = False
    rate: float | None = None  # records per second when sending to Kinesis


@dataclass
class SimResult:
    out: Path
    changes: list[Change]
    kinesis: list[KinesisRecord]
    s3_files: dict[str, bytes]
    manifest: dict[str, Any]
    seconds: float = 0.0


def dq_failing_changes(project: Project, changes: list[Change]) -> set[int]:
    out = set()
    for ch in changes:
        t = project.tables.get(ch.table)
        if t is not None and ch.op in ("load", "insert", "update") and failing_rule(t, ch.data or {}) is not None:
            out.add(ch.source_seq)
    return out


def _kinesis_file(pos: int) -> tuple[str, int]:
    return f"kinesis/part-{pos // KINESIS_LINES_PER_FILE:05d}.jsonl", pos % KINESIS_LINES_PER_FILE + 1


def simulate(project: Project, out: str | Path, opts: SimOptions, config_dir: str | Path | None = None,
             progress: Any = None) -> SimResult:
    """Generate, encode, inject faults and write the output folder; optionally send / upload."""
    out = Path(out)
    if out.exists():
        for sub in ("kinesis", "s3"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    hist = generate_history(project, opts.seed, opts.gen)
    changes = hist.changes
    dq = dq_failing_changes(project, changes)
    before_image = opts.before_image or opts.gen.pk_change_rate > 0

    records = encode_history(project, changes, opts.seed, opts.partition_key_type, before_image,
                             opts.dms_type_naming)
    delivered, k_faults = inject_kinesis(project, records, changes, opts.faults, opts.seed, dq)
    for f in k_faults:
        if "position" in f:
            f["file"], f["line"] = _kinesis_file(f["position"])
    s3_files, s3_faults = S3Writer(project, opts.seed, opts.s3, opts.faults, dq).build(changes)

    with (out / "history.jsonl").open("w") as fh:
        for ch in changes:
            fh.write(json.dumps(ch.to_dict(), separators=(",", ":")) + "\n")
    (out / "kinesis").mkdir(exist_ok=True)
    files: list[str] = []
    for start in range(0, max(1, len(delivered)), KINESIS_LINES_PER_FILE):
        name, _ = _kinesis_file(start)
        files.append(name)
        (out / name).write_text("".join(r.payload + "\n" for r in delivered[start:start + KINESIS_LINES_PER_FILE]))
    write_local(s3_files, out / "s3")

    history_dicts = [ch.to_dict() for ch in changes]
    manifest: dict[str, Any] = {
        "seed": opts.seed,
        "config_dir": str(Path(config_dir).resolve()) if config_dir else str(project.config_dir.resolve()),
        "tables": sorted(project.tables),
        "options": {
            "generator": {**asdict(opts.gen), "change_interval_ms": list(opts.gen.change_interval_ms)},
            "faults": opts.faults.as_dict(),
            "s3": asdict(opts.s3),
            "partition_key_type": opts.partition_key_type,
            "before_image": before_image,
            "dms_type_naming": opts.dms_type_naming,
            "rate": opts.rate,
        },
        "fault_semantics": "bad records are extra copies; the genuine change is delivered too (docs/simulator.md)",
        "counts": {"changes": len(changes), "kinesis_records": len(delivered), "s3_files": len(s3_files),
                   "per_table": op_counts(history_dicts)},
        "kinesis": {"files": files, "partition_key_type": opts.partition_key_type,
                    "before_image_field": BEFORE_IMAGE_FIELD if before_image else None},
        "s3": {"layout": opts.s3.layout,
               "timestamp_column": opts.s3.timestamp_column if opts.s3.has_timestamp else None,
               "change_seq_column": CHANGE_SEQ_COLUMN if opts.s3.has_change_seq else None},
        "dq_injected": hist.dq_injected,
        "faults": {"kinesis": k_faults, "s3": s3_faults},
        "expected_quarantine": {
            target: [{"table": t, "rule": r, "count": n}
                     for (t, r), n in sorted(expected_quarantine(project, history_dicts, fl).items(),
                                             key=lambda kv: (kv[0][0] or "", kv[0][1]))]
            for target, fl in (("kinesis", k_faults), ("s3", s3_faults))
        },
    }
    seconds = time.perf_counter() - started

    if opts.send_kinesis:
        from cdcflow.aws import ensure_stream, project_client

        k = project_client(project, "kinesis")
        ensure_stream(k, project.pipeline.kinesis.stream, project.pipeline.kinesis.shards)
        manifest["kinesis"]["stream"] = project.pipeline.kinesis.stream
        manifest["kinesis"]["sent"] = send(k, project.pipeline.kinesis.stream, delivered, opts.rate, progress)
    if opts.upload_s3:
        uri = project.pipeline.dms.raw_uri
        if uri.startswith(("s3://", "s3a://")):
            from cdcflow.aws import ensure_bucket, project_client, split_s3

            bucket, prefix = split_s3(uri)
            s3 = project_client(project, "s3")
            ensure_bucket(s3, bucket)
            upload(s3, bucket, prefix, s3_files)
        else:
            write_local(s3_files, Path(uri))
        manifest["s3"]["uri"] = uri
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False, default=str) + "\n")
    return SimResult(out, changes, delivered, s3_files, manifest, seconds)
