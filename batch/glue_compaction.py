"""AWS Glue entry point of the `<pipeline>-compaction` job (daily): `cdcflow compact` inside Glue.

Uploaded as s3://<artifacts>/scripts/glue_compaction.py (infra/). The CLI's run (`batch.cli.run_compaction`:
only tables and bronze partitions past their thresholds, the retention floor, the JSON report and the EMF
metrics) over `--tables` when given, else every table. Commit conflicts with the running stream are retried there;
anything else propagates, so Glue marks the run FAILED.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from awsglue.context import GlueContext
    from pyspark.context import SparkContext

    from batch.cli import run_compaction
    from cdcflow.glue import glue_project, resolve_options
    from cdcflow.metrics import MetricsSink
    from cdcflow.runtime import get_spark

    GlueContext(SparkContext.getOrCreate())  # Glue's session, with --datalake-formats delta
    argv = sys.argv if argv is None else argv
    project = glue_project(argv)
    # --tables (Step Functions passes the tables the flow touched): a comma-separated list, or all
    tables = resolve_options(argv, ["tables"])["tables"].split(",") if "--tables" in argv else None
    tables = [t for t in tables or [] if t in project.tables] or None
    run_compaction(get_spark(mode="glue"), project, tables, project.pipeline.defaults.vacuum_min_retention_hours,
                   False, MetricsSink(project.pipeline.name), print)


if __name__ == "__main__":  # pragma: no cover
    main()
