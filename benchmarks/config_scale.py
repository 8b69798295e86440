"""Benchmark: the 1000-table configuration path, without Spark.

    python -m benchmarks.config_scale [--tables 1000]

Times loading and validating N table files (`load_project`) and simulating DMS output for N synthetic
tables (`cdcflow simulate --tables N`). Targets: config load well under 2 s for 1000 tables.
Writes benchmarks/results/config_scale.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import save_result

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "config_scale.json"


def main(argv: list[str] | None = None) -> int:
    from cdcflow.config import load_project
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions
    from cdcflow.sim.synthetic import write_configs

    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=1000)
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cdcflow-bench-config-"))
    try:
        cfg = write_configs(REPO / "configs", work / "configs", args.tables)
        load_project(cfg, env={})  # warm imports
        start = time.perf_counter()
        project = load_project(cfg, env=dict(os.environ))
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        simulate(project, work / "sim", SimOptions(seed=1, gen=GenOptions(events=args.events)), cfg)
        sim_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "tables": len(project.tables),
        "config_load_seconds": round(load_s, 3),
        "simulate_seconds": round(sim_s, 2),
        "simulate_events": args.events,
        "target_config_load_seconds": 2.0,
        "target_met": load_s < 2.0,
    }
    save_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
