"""`cdcflow compact` beside a running stream on the same tables: no failed batch, nothing lost."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from batch.compaction import compact
from cdcflow.config.models import CompactionThresholds
from tests.streaming_helpers import project_in, simulate_to, split_replay, verify_against_oracle
from tests.test_streaming_crash import commits, stream_process, wait_for

pytestmark = [pytest.mark.spark]  # the stream runs in a process of its own (main tier)


def test_compaction_passes_while_the_stream_commits_then_verify_matches(spark, tmp_path):
    project = project_in(tmp_path, CDCFLOW_RAW_URI=str(tmp_path / "raw"))
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=400, duplicate_rate=0.05, out_of_order_rate=0.1)
    replay = split_replay(sim, tmp_path / "replay", batches=8)
    for name, t in project.tables.items():  # rewrite every pass (Z-ORDER rewrites even one file)
        project.tables[name] = replace(t, compaction=CompactionThresholds(min_small_files=1, small_file_share=0))

    # The default JVM: this stream runs for minutes beside compaction passes (with C1 only and 6 batches
    # a run isolated three tables in its last batch and hung; not investigated, so kept as it was).
    proc = stream_process(tmp_path, replay, "--until-caught-up", fast_jvm=False)
    wait_for(lambda: commits(tmp_path / "lake" / "bronze") >= 1 or proc.poll() is not None)
    passes = []
    deadline = time.monotonic() + 900  # a stuck stream fails the test instead of hanging the suite
    while proc.poll() is None and time.monotonic() < deadline:  # compaction passes while batches commit
        passes.append(compact(spark, project))
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=600)
    passes.append(compact(spark, project))
    assert proc.returncode == 0, out[-3000:]
    assert len(passes) >= 3, len(passes)
    compacted = {r.table for p in passes[:-1] for r in p if r.action == "compacted" and r.files_removed}
    assert "shop.customers" in compacted and "bronze" in compacted, compacted  # rewritten while batches committed

    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not [m for m in metrics if "TableIsolated" in m or "SchemaChangeUnsafe" in m]  # no failed table
    bad = [d for d in verify_against_oracle(spark, project, sim) if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
