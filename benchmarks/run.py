"""`make bench`: every benchmark in turn, each in its own process (one SparkSession each).

Results land in benchmarks/results/*.json. Benchmarks are not tests: they report numbers and targets,
they do not fail on them.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["config_scale", "warehouse_scd2", "full_load", "compaction", "silver_writer", "silver_commit", "streaming",
              "batch_breakdown"]


def main() -> int:
    failed = []
    for name in sys.argv[1:] or BENCHMARKS:
        print(f"== benchmarks.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks that did not complete: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
