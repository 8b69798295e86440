"""Benchmark: batch full load of 1M rows of shop.customers from DMS S3 Parquet LOAD files into silver Delta.

    python -m benchmarks.full_load [--rows 1000000] [--files 4]

Generates the rows as DMS LOAD Parquet files (`LOAD00000001.parquet` ..., the DMS timestamp column,
the declared columns, `$AR_H_CHANGE_SEQ`) with pyarrow in a temp folder, then times
`batch.full_load.run_full_load` (read, type, check the raw_to_staging rules, mask PII (hash + redact),
collapse, write silver, quarantine, manifest) on a local SparkSession, twice: in a cold JVM, then
again into a fresh lake with the JIT warm. Target: 100k rows/s on 2 cores.
Writes benchmarks/results/full_load.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import save_result

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "full_load.json"
TARGET = 100_000
TABLE = "shop.customers"


def write_load_files(root: Path, rows: int, files: int, seed: int = 7) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder = root / "shop" / "customers"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    per = -(-rows // files)
    base = np.datetime64("2020-01-01T00:00:00", "us")
    for k in range(files):
        lo, hi = k * per, min(rows, (k + 1) * per)
        n = hi - lo
        ids = np.arange(lo + 1, hi + 1, dtype=np.int64)
        idtext = ids.astype(str)
        created = base + rng.integers(0, 4 * 365 * 86400, n).astype("timedelta64[s]")
        t = pa.table({
            "dms_commit_ts": pa.array(["2024-01-01 00:00:00.000000"] * n, pa.string()),
            "customer_id": pa.array(ids),
            "email": pa.array(np.char.add(np.char.add("user", idtext), "@example.com")),
            "phone": pa.array(np.char.add("+49-30-", idtext)),
            "full_name": pa.array(np.char.add("Customer ", idtext)),
            "country": pa.array(rng.choice(np.array(["DE", "FR", "US", "GB", "NL"]), n)),
            "segment": pa.array(rng.choice(np.array(["consumer", "business", "vip"]), n)),
            "created_at": pa.array(created.astype("datetime64[us]"), pa.timestamp("us")),
            "updated_at": pa.array(created.astype("datetime64[us]"), pa.timestamp("us")),
            "$AR_H_CHANGE_SEQ": pa.nulls(n, pa.string()),
        })  # fmt: skip
        path = folder / f"LOAD{k + 1:08X}.parquet"
        pq.write_table(t, path, compression="snappy")
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args(argv)

    from batch.full_load import run_full_load
    from cdcflow.config import load_project
    from cdcflow.runtime import get_spark

    with tempfile.TemporaryDirectory(prefix="cdcflow-bench-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        write_load_files(tmp_path / "raw", args.rows, args.files)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        spark = get_spark("cdcflow-bench-full-load", batch=True)  # as `cdcflow full-load`
        spark.range(1).count()  # JVM start-up is not part of the load
        startup_s = time.perf_counter() - t0
        # Twice, into fresh lakes: the first load runs in a cold JVM (one table loaded by a fresh job),
        # the second after the JIT has compiled the hot paths (the later tables of a multi-table load).
        loads = []
        for run in ("cold", "warm"):
            env = {**os.environ, "CDCFLOW_RAW_URI": str(tmp_path / "raw"),
                   "CDCFLOW_LAKE_ROOT": str(tmp_path / f"lake-{run}"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck")}
            project = load_project(REPO / "configs", env=env)
            t0 = time.perf_counter()
            result = run_full_load(spark, project, [TABLE], archive=False)
            load_s = time.perf_counter() - t0
            silver = spark.read.format("delta").load(project.path(project.table(TABLE).delta_path)).count()
            loads.append((result, load_s, silver))
    (result, load_s, silver), (_, warm_s, _) = loads
    rate, warm_rate = result.rows / load_s, result.rows / warm_s
    out = {
        "benchmark": "full_load",
        "table": TABLE,
        "rows": result.rows,
        "files": result.files,
        "silver_rows": silver,
        "quarantined": result.quarantined,
        "seconds": round(load_s, 2),
        "rows_per_second": round(rate),
        "target_rows_per_second": TARGET,
        "meets_target": rate >= TARGET,
        "warm_jvm": {"seconds": round(warm_s, 2), "rows_per_second": round(warm_rate),
                     "meets_target": warm_rate >= TARGET,
                     "what": "the same load again in the same SparkSession into a fresh lake: JIT-compiled "
                             "Spark, generated code for this table's plan cached"},
        "spark_startup_seconds": round(startup_s, 1),
        "generate_seconds": round(gen_s, 1),
        "includes": "read LOAD Parquet, type + raw_to_staging rules, PII hash/redact, collapse, first write of "
                    "silver Delta, quarantine, manifest (run_full_load, archive off)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 1)},
        "note": "local SparkSession (local[*]), shuffle partitions from pipeline.yaml; the machine is shared "
                "with other test runs",
        "date": dt.date.today().isoformat(),
    }
    save_result(RESULTS, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
