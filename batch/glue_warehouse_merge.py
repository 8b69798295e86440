"""AWS Glue entry point of the `<pipeline>-warehouse-merge` job (hourly): `cdcflow warehouse-merge` in Glue.

Uploaded as s3://<artifacts>/scripts/glue_warehouse_merge.py (infra/README.md). Merges every warehouse
table's new bronze changes (dimensions first) with `batch.warehouse_job.merge_from_lake`, the function
the CLI's lake mode calls, and prints the same DQ summary. The warehouse URL is `warehouse.url`, which
`--redshift-secret-id` fills through CDCFLOW_WAREHOUSE_URL (a redshift:// URL: redshift_connector, with
staging COPYed from `warehouse.s3_staging`); a postgresql:// URL works too. Any error propagates, so
Glue marks the run FAILED.
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from cdcflow.config import Project
from cdcflow.errors import UserError

SCHEMES = ("redshift", "postgresql", "postgres")  # batch.warehouse.connection.connect


def warehouse_url(project: Project) -> str:
    """The warehouse URL; fail early, naming only the scheme (the URL holds the password)."""
    url = project.pipeline.warehouse.url
    if not url:
        raise UserError("no warehouse URL: set warehouse.url (CDCFLOW_WAREHOUSE_URL or --redshift-secret-id)")
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise UserError(f"warehouse.url must be a redshift:// or postgresql:// URL, not {scheme or 'no'}://")
    return url


def main(argv: list[str] | None = None) -> None:
    from awsglue.context import GlueContext
    from pyspark.context import SparkContext

    from batch.warehouse_job import merge_from_lake, summary_rows
    from cdcflow.glue import glue_project, print_rows
    from cdcflow.runtime import get_spark

    GlueContext(SparkContext.getOrCreate())  # Glue's session, with --datalake-formats delta
    project = glue_project(sys.argv if argv is None else argv)
    url = warehouse_url(project)
    run = merge_from_lake(get_spark(mode="glue"), project, url)
    print_rows(f"data quality, run {run.run_id}",
               ["table", "stage", "rows", "failures (rule, severity, rows)", "quarantined", "merged"],
               summary_rows(run))
    print(f"report: {run.report_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
