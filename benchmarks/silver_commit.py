"""How delta-rs should commit a MERGE into silver: its own MERGE, or the table read whole, merged in
Arrow and rewritten (copy-on-write, cdcflow.cdc.arrow_merge), by table size. No Spark.

Both commit through `apply._rs_merge` with the same clauses (`apply.merge_clauses` of shop.products)
on tables built alike; each repetition applies a new set of changes (half updates of present keys,
half new keys, every fifth a delete) with a newer sequence. Median CPU and wall ms per commit, and
the table's Parquet bytes, written to results/silver_commit.json; `apply.COPY_ON_WRITE_MAX_BYTES`
is set from where copy-on-write stops winning.

    python -m benchmarks.silver_commit [--sizes 40,1000,10000,100000,400000] [--changes 25,1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from benchmarks import save_result

RESULTS = Path(__file__).resolve().parent / "results" / "silver_commit.json"
REPO = Path(__file__).resolve().parent.parent


def _rows(keys: range | list[int], seq: int, deletes: bool):
    import pyarrow as pa

    now = datetime.now(UTC)
    keys = list(keys)
    ops = ["delete" if deletes and i % 5 == 4 else "update" for i in range(len(keys))]
    return {
        "product_id": pa.array(keys, pa.int64()), "sku": [f"SKU-{k:08d}" for k in keys],
        "name": [f"product {k} v{seq}" for k in keys], "category": ["books"] * len(keys),
        "price": pa.array([Decimal("9.99")] * len(keys), pa.decimal128(10, 2)), "active": [True] * len(keys),
        "updated_at": pa.array([now] * len(keys), pa.timestamp("us", tz="UTC")),
        "_op": ops, "_seq": [f"{seq:06d}{k:012d}" for k in keys],
        "_commit_ts": pa.array([now] * len(keys), pa.timestamp("us", tz="UTC")),
        "_ingested_at": pa.array([now] * len(keys), pa.timestamp("us", tz="UTC")),
    }  # fmt: skip


def run(work: Path, rows: int, changes: int, reps: int) -> dict:
    import pyarrow as pa
    from deltalake import write_deltalake

    from cdcflow.cdc import apply
    from cdcflow.cdc.changes import TableShape
    from cdcflow.config import load_project

    project = load_project(REPO / "configs", env={**os.environ, "CDCFLOW_LAKE_ROOT": str(work)})
    shape = TableShape(project.table("shop.products"))
    m = apply.merge_clauses(shape, [], apply._dq, partial=False)
    base = _rows(range(rows), 1, deletes=False)
    base |= {"_is_deleted": [False] * rows, "_deleted_at": pa.nulls(rows, pa.timestamp("us", tz="UTC"))}
    out: dict = {"rows": rows, "changes": changes}
    for engine, limit in (("merge", -1), ("copy_on_write", 1 << 40)):
        path = str(work / f"{engine}-{rows}-{changes}")
        write_deltalake(path, pa.table(base))
        apply.COPY_ON_WRITE_MAX_BYTES = limit
        cpu, wall = [], []
        for rep in range(reps):
            keys = [(rep * 7919 + i * 104729) % rows for i in range(changes // 2)]
            keys = sorted(set(keys)) + list(range(rows + rep * changes, rows + rep * changes + changes // 2))
            source = pa.table(_rows(keys, rep + 2, deletes=True))
            c0, w0 = time.process_time(), time.perf_counter()
            apply._rs_merge(path, source, m)
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - w0) * 1000)
        size = sum(f.stat().st_size for f in Path(path).glob("*.parquet"))
        live = apply.table_files(apply.rs_table(path)).size_bytes
        out[engine] = {"cpu_ms": round(statistics.median(cpu), 1), "wall_ms": round(statistics.median(wall), 1),
                       "table_bytes": live, "bytes_written_total": size}
    out["copy_on_write_vs_merge"] = round(out["merge"]["cpu_ms"] / out["copy_on_write"]["cpu_ms"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="40,1000,10000,100000,400000")
    ap.add_argument("--changes", default="25,1000")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cdcflow-bench-commit-"))
    try:
        result = [run(work, int(r), int(c), args.reps) for r in args.sizes.split(",") for c in args.changes.split(",")
                  if int(c) <= max(int(r), 100)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(RESULTS, {"python_threads": 1, "runs": result})


if __name__ == "__main__":
    main()
