"""AWS Glue entry point of the `<pipeline>-full-load` job: `cdcflow full-load` inside Glue.

Uploaded as s3://<artifacts>/scripts/glue_full_load.py (infra/README.md). Applies the DMS S3 Parquet
under dms.raw_uri (LOAD files, then CDC files in time order) to silver with `batch.full_load.run_full_load`,
the function the CLI calls, with the CLI's defaults (every table, archive applied files). Any error
propagates, so Glue marks the run FAILED. A run started with `--reload schema.table[,schema.table...]`
applies those tables' LOAD files as a DMS reload's complete snapshot (`cdcflow full-load --reload`);
`--as_of TIME|dms` places it at the reload's start (`--as-of`, for tables whose changes come through Kinesis;
`dms`: when the stack's S3 task began its last finished full load).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from awsglue.context import GlueContext
    from pyspark.context import SparkContext

    from batch.cli import reload_time
    from batch.full_load import run_full_load
    from cdcflow.glue import glue_project, print_rows, resolve_options
    from cdcflow.runtime import get_spark

    GlueContext(SparkContext.getOrCreate())  # Glue's session, with --datalake-formats delta
    argv = sys.argv if argv is None else argv
    project = glue_project(argv)
    reload = resolve_options(argv, ["reload"])["reload"].split(",") if "--reload" in argv else []
    unknown = [t for t in reload if t not in project.tables]
    if unknown:
        raise ValueError(f"--reload: unknown table(s) {', '.join(unknown)}")
    if "--as_of" in argv and not reload:
        raise ValueError("--as_of: only with --reload")
    as_of = reload_time(resolve_options(argv, ["as_of"])["as_of"], project) if "--as_of" in argv else None
    result = run_full_load(get_spark(mode="glue"), project, progress=None,
                           **({"reload": reload, "reload_as_of": as_of} if reload else {}))
    print_rows("full load", list(result.COLUMNS), result.summary_rows())
    print(f"{result.files} files applied, {result.skipped} already applied, {result.rows} rows, "
          f"{result.quarantined} quarantined")
    for line in result.reload_lines():
        print(line)
    problem = result.rewritten_problem()
    if problem:  # the other tables are loaded; the run fails so the table left unloaded is seen (alarm)
        raise RuntimeError(problem)


if __name__ == "__main__":  # pragma: no cover
    main()
