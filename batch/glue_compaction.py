"""AWS Glue entry point of the `<pipeline>-compaction` job (daily): `cdcflow compact` inside Glue.

Uploaded as s3://<artifacts>/scripts/glue_compaction.py (infra/README.md). OPTIMIZE + Z-ORDER, hard-delete
tombstone GC and VACUUM of every table with `batch.compaction.compact`, the function the CLI calls, with
the CLI's defaults (168 h VACUUM retention). Commit conflicts with the running stream are retried there;
anything else propagates, so Glue marks the run FAILED.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from awsglue.context import GlueContext
    from pyspark.context import SparkContext

    from batch.compaction import compact
    from cdcflow.glue import glue_project, print_rows
    from cdcflow.runtime import get_spark

    GlueContext(SparkContext.getOrCreate())  # Glue's session, with --datalake-formats delta
    project = glue_project(sys.argv if argv is None else argv)
    results = compact(get_spark(mode="glue"), project)
    print_rows("compaction", ["table", "files before", "files after", "tombstones removed"],
               [[r.table, r.files_before, r.files_after, r.tombstones_removed] for r in results])


if __name__ == "__main__":  # pragma: no cover
    main()
