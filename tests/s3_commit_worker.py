"""A process that commits many small appends to one Delta table on S3 (tests/test_s3_lake.py runs
several at once): `python -m tests.s3_commit_worker ENGINE TABLE WRITER WRITERS N GATE [LOGSTORE]`.

ENGINE is spark or delta-rs; WRITER is this worker's letter, WRITERS all the workers' ("abc"). Each
append is one row (writer, i) and one commit. The worker writes GATE + ".<writer>.ready" once it can
commit (a Spark session costs seconds), then waits for GATE to exist, so the workers' commits overlap;
before its i-th append it waits (up to a minute) for every other writer's (i-1)-th, so they go in step
and race for each version whatever each engine's speed (a delta-rs append takes milliseconds, a cold
Spark one seconds). LOGSTORE (spark only) replaces the log store class for the s3/s3a schemes: the
test's mutation check runs Delta's default S3SingleDriverLogStore through it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(engine: str, table: str, writer: str, writers: str, n: int, gate: str, logstore: str | None = None) -> int:
    from cdcflow.config import load_project

    load_project("configs")  # the lake's S3 settings (endpoint, credentials) from the environment's config
    if engine == "spark":
        from cdcflow.runtime import get_spark

        conf = {f"spark.delta.logStore.{s}.impl": logstore for s in ("s3", "s3a")} if logstore else {}
        spark = get_spark(f"commit-{writer}", extra_conf=conf)
        schema = "writer string, i int"
        # Warm the write path (the first Delta write plans and compiles for seconds) on a scratch table.
        spark.createDataFrame([(writer, -1)], schema).write.format("delta").mode("append").save(f"{table}-warm-{writer}")

        def append(i: int) -> None:
            spark.createDataFrame([(writer, i)], schema).write.format("delta").mode("append").save(table)
    else:
        import pyarrow as pa
        from deltalake import write_deltalake

        from cdcflow.cdc.apply import rs_uri
        from cdcflow.storage import rs_options

        def append(i: int) -> None:
            rows = pa.table({"writer": pa.array([writer]), "i": pa.array([i], pa.int32())})
            for attempt in range(50):  # an append never conflicts logically: a lost race is retried
                try:
                    write_deltalake(rs_uri(table), rows, mode="append", storage_options=rs_options(table))
                    return
                except Exception as e:  # noqa: BLE001 - delta-rs' CommitFailedError on a lost version race
                    if "CommitFailed" not in type(e).__name__ and "already exists" not in str(e) or attempt == 49:
                        raise
                    time.sleep(0.02)

    Path(f"{gate}.{writer}.ready").write_text("")
    while not Path(gate).exists():
        time.sleep(0.02)
    others = [w for w in writers if w != writer]
    for i in range(n):
        deadline = time.monotonic() + 60
        while i and not all(Path(f"{gate}.{w}.{i - 1}").exists() for w in others) and time.monotonic() < deadline:
            time.sleep(0.01)
        append(i)
        Path(f"{gate}.{writer}.{i}").write_text("")
    print(f"{writer}: {n} commits", flush=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0], args[1], args[2], args[3], int(args[4]), args[5], args[6] if len(args) > 6 else None))
