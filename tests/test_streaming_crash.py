"""Crash and stop behaviour of the real `cdcflow stream` process: kill -9 mid-batch, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.streaming_helpers import project_in, simulate_to, split_replay, verify_against_oracle

pytestmark = [pytest.mark.spark]


# A stream process here lives for a few batches of tiny data: its JVM spends them compiling Spark's
# planner and codegen paths, not in hot loops. C1 alone gets through that sooner and leaves both cores to
# the work (the crash test: 174 s -> 121 s measured; JIT tiers change no results).
FAST_JVM = "-XX:TieredStopAtLevel=1"


def stream_process(tmp: Path, replay: Path, *extra: str, fast_jvm: bool = True) -> subprocess.Popen:
    env = {**os.environ, "CDCFLOW_LAKE_ROOT": str(tmp / "lake"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp / "ck"),
           **({"JDK_JAVA_OPTIONS": FAST_JVM} if fast_jvm else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "cdcflow.cli", "stream", "--replay", str(replay), "--trigger-seconds", "1",
         "--metrics-file", str(tmp / "metrics.jsonl"), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for(predicate, timeout: float = 240, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError("condition not reached")


def commits(table: Path) -> int:
    return len(list((table / "_delta_log").glob("*.json"))) if table.exists() else 0


def test_kill_9_mid_batch_then_a_restart_stopped_by_sigterm_loses_and_duplicates_nothing(spark, tmp_path):
    """kill -9 inside a batch, then a restart that re-runs it and is stopped by SIGTERM while its last
    batch runs: that batch finishes, the process exits cleanly, nothing is lost or applied twice. (One
    test for both: each stream process costs a JVM start and its warm-up, most of the test's time.)"""
    project = project_in(tmp_path)
    sim = tmp_path / "sim"
    # Three batches: the kill lands in batch 1, so the restart re-runs it and then runs batch 2.
    simulate_to(project, sim, events=200, duplicate_rate=0.05, out_of_order_rate=0.1, malformed_json_rate=0.02,
                missing_primary_key_rate=0.02)
    replay = split_replay(sim, tmp_path / "replay", batches=3)
    delivered = sum(len([x for x in f.read_text().splitlines() if x.strip()]) for f in replay.iterdir())

    proc = stream_process(tmp_path, replay)
    # A batch MERGEs the silver tables, then appends bronze and quarantine, then checkpoints. Kill -9
    # as soon as a silver table takes its second commit: batch 1 is then half applied, its bronze is
    # (most likely) not written, and it is not checkpointed.
    silver = tmp_path / "lake" / "silver"
    wait_for(lambda: proc.poll() is not None or any(commits(t) >= 2 for t in silver.glob("*/*")), poll=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = tmp_path / "ck" / project.pipeline.name / "replay"
    in_flight = {p.name for p in (ck / "offsets").glob("[0-9]*")} - {p.name for p in (ck / "commits").glob("[0-9]*")}
    assert in_flight, "the kill should land inside a batch"
    last = ck / "offsets" / "2"
    assert not last.exists()

    # Continuous (only a signal stops it). Spark logs a batch's offsets when the batch starts: SIGTERM
    # as soon as the last one's appear, so it lands while that batch runs.
    restarted = stream_process(tmp_path, replay)
    wait_for(lambda: last.exists() or restarted.poll() is not None, poll=0.05)
    restarted.send_signal(signal.SIGTERM)
    out, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "stopping after the current batch" in out, out[-3000:]
    # The batch in flight finished: its checkpoint commit exists for every bronze commit.
    assert {p.name for p in (ck / "commits").glob("[0-9]*")} == {"0", "1", "2"}
    assert len(list((ck / "commits").glob("[0-9]*"))) == commits(tmp_path / "lake" / "bronze")

    bronze = spark.read.format("delta").load(project.path("bronze"))
    assert bronze.count() == delivered  # the re-run batch was not appended twice, the last one is whole
    bad = [d for d in verify_against_oracle(spark, project, sim) if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
