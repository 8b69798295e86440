"""Helpers shared by the streaming tests: projects in tmp folders, simulator runs, replay splitting, verify."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cdcflow.config import Project, load_project
from tests.conftest import CONFIGS

# A stream process in a test lives for a few batches of tiny data: its JVM spends them compiling Spark's
# planner and codegen paths, not in hot loops. C1 alone gets through that sooner and leaves both cores to
# the work (a kill -9 and restart test: 174 s -> 121 s measured; JIT tiers change no results). Not for
# a pytest session's own JVM, which lives for minutes: the Glue tier took 587 s with it, 355 s without.
FAST_JVM = "-XX:TieredStopAtLevel=1"


def wait_for(predicate, timeout: float = 240, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError("condition not reached")


def project_in(tmp: Path, config_dir: Path = CONFIGS, **env: str) -> Project:
    return load_project(
        config_dir,
        env={**os.environ, "CDCFLOW_LAKE_ROOT": str(tmp / "lake"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp / "ck"), **env},
    )


def simulate_to(project: Project, out: Path, seed: int = 7, events: int = 300, **faults: float):
    from cdcflow.sim.faults import FaultOptions
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions

    gen_keys = {"null_update_rate", "partial_update_rate", "pk_change_rate", "dq_failure_rate", "dirty_value_rate", "schema_drift_rate",
                "change_interval_ms", "drop_table_rate"}
    gen = GenOptions(events=events, **{k: v for k, v in faults.items() if k in gen_keys})
    fopts = FaultOptions(**{k: v for k, v in faults.items() if k not in gen_keys})
    return simulate(project, out, SimOptions(seed=seed, gen=gen, faults=fopts))


def split_replay(history_dir: Path, dest: Path, batches: int) -> Path:
    """Split the delivered Kinesis records into `batches` files, in delivery order (mtime order too)."""
    lines: list[str] = []
    for f in sorted((history_dir / "kinesis").glob("*.jsonl")):
        lines += [line for line in f.read_text().splitlines() if line.strip()]
    dest.mkdir(parents=True, exist_ok=True)
    size = -(-len(lines) // batches)
    for i in range(batches):
        f = dest / f"part-{i:05d}.jsonl"
        f.write_text("\n".join(lines[i * size:(i + 1) * size]) + "\n")
        os.utime(f, (1_700_000_000 + i, 1_700_000_000 + i))
    return dest


def verify_against_oracle(spark, project: Project, history_dir: Path, transforms: dict | None = None):
    from cdcflow.oracle import build_oracle, load_history, resolve_salt
    from cdcflow.verify import read_actual, verify

    oracle = build_oracle(project, load_history(history_dir), resolve_salt(project), "kinesis", transforms=transforms)
    return verify(project, oracle, read_actual(project, spark))


def keep_on_own_plan(config_dir: Path, table: str, after_rule: str, column: str) -> None:
    """Give `table` a warn rule (on `column`, always passing) after its raw_to_staging rule line
    `after_rule`: warn rules are counted before the commit on the table's own plan, so the many-table
    plan leaves the table to it."""
    f = config_dir / "tables" / f"{table}.yaml"
    text = f.read_text()
    line = f"    - {after_rule}\n"
    assert line in text
    f.write_text(text.replace(line, line + f"    - {{rule: regex, column: {column}, pattern: '^.*$', severity: warn}}\n"))


def tidy_customer(row: dict) -> dict:
    """customers' raw_to_staging transforms by their meaning: `upper(trim(country))` (SQL) and
    shop_transforms:normalise_text(columns=[full_name], case=title) (DataFrame API)."""
    out = dict(row)
    if out.get("country") is not None:
        out["country"] = out["country"].strip(" ").upper()
    if out.get("full_name") is not None:
        out["full_name"] = " ".join(w[:1].upper() + w[1:].lower() for w in out["full_name"].split())
    return out


def expected_late(replay: Path, project: Project) -> int:
    """Data records of configured tables that the stream must count as late when it reads `replay`'s
    files one per micro-batch: committed before (newest commit time of the earlier batches -
    watermark). Computed from the files alone, in Python, as an oracle for the processor's count."""
    import json
    from datetime import datetime, timedelta

    delay = timedelta(minutes=project.pipeline.streaming.watermark_minutes)
    newest: datetime | None = None
    late = 0
    for f in sorted(replay.iterdir()):
        batch_newest = newest
        for line in f.read_text().splitlines():
            try:
                meta = json.loads(line)["metadata"]
            except (ValueError, KeyError, TypeError):
                continue  # malformed: no commit time
            control = str(meta.get("record-type", "")).lower() == "control"
            stamp = meta.get("commit-timestamp") or (meta.get("timestamp") if control else None)
            if not stamp:
                continue
            ts = datetime.fromisoformat(stamp.replace("Z", ""))
            table = f"{meta.get('schema-name')}.{meta.get('table-name')}"
            if not control and table in project.tables and newest and ts < newest - delay:
                late += 1
            batch_newest = ts if batch_newest is None or ts > batch_newest else batch_newest
        newest = batch_newest
    return late
