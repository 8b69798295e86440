"""PII masking, applied before anything is written or logged (docs/design.md).

hash: sha256 hex of salt + "|" + value; redact: "[REDACTED]"; drop: the column is removed.

A replayed archive (cdcflow.archive.records) holds its `hash` columns hashed already, and each line
says which: the replay source carries that list as the `_prehashed` column of the normalized changes
(cdcflow.cdc.envelope), and `hash` keeps those values as they are, so silver and bronze built from an
archive equal those built from Kinesis. Only the columns a line names are spared: a column made
`hash` after the line was archived is hashed on replay, so nothing unmasked gets through.
"""

from __future__ import annotations

import hashlib
import os

from pyspark.sql import Column
from pyspark.sql import functions as F

from cdcflow.config import Project
from cdcflow.errors import UserError
from cdcflow.runtime import sql_text

REDACTED = "[REDACTED]"
PREHASHED = "_prehashed"  # array<string>: the columns a record's source already hashed (see above)
LOCAL_SALT = "cdcflow-local-salt"


def pii_salt(project: Project) -> str:
    """The salt comes from a secret (env var); only local runs may fall back to a fixed salt."""
    salt = os.environ.get(project.pipeline.pii.salt_env)
    if salt:
        return salt
    if project.pipeline.environment == "local":
        return LOCAL_SALT
    raise UserError(f"environment variable {project.pipeline.pii.salt_env} (the PII hashing salt) is not set")


def mask_value(value: str | None, method: str, salt: str) -> str | None:
    """The Python twin of mask_column, for values masked outside Spark (logs, the CLI)."""
    if value is None:
        return None
    if method == "hash":
        return hashlib.sha256(f"{salt}|{value}".encode()).hexdigest()
    if method == "redact":
        return REDACTED
    raise ValueError(method)


def prehashed(column: str | Column) -> Column:
    """Whether the record's `column` value is hashed already (its name is in `_prehashed`; null: no)."""
    return F.array_contains(F.col(PREHASHED), column)


def mask_column(col: Column, method: str, salt: str, hashed: Column | None = None) -> Column:
    """`hashed`: where true, a `hash` value is this salt's hash already (see the module doc), kept as is."""
    text = col.cast("string")
    if method == "hash":
        digest = F.sha2(F.concat(F.lit(salt + "|"), text), 256)
        if hashed is not None:
            digest = F.when(hashed, text).otherwise(digest)  # a null `hashed` hashes
        return F.when(text.isNull(), F.lit(None).cast("string")).otherwise(digest)
    if method == "redact":
        return F.when(text.isNull(), F.lit(None).cast("string")).otherwise(F.lit(REDACTED))
    raise ValueError(method)


def pii_methods(table_column: str, project: Project) -> Column:
    """Each row's table's PII methods (column -> hash / redact / drop; null for a table without any), for
    `masked_data_map`. One literal map of the tables with PII keeps the plan one expression however many
    tables there are (a JVM call per entry cost about 0.9 s of driver time a micro-batch at 1004
    tables). `element_at`, not `[]`: Spark inlines a `[]` lookup (cheap to it) into every lambda that
    reads the column, which would look the table up again for each entry of each map."""
    by_table = {t.name: t.pii for t in project.tables.values() if t.pii}
    if not by_table:
        return F.lit(None).cast("map<string,string>")
    maps = ", ".join(f"{sql_text(name)}, map({', '.join(sql_text(x) for kv in pii.items() for x in kv)})"
                     for name, pii in by_table.items())  # fmt: skip
    return F.element_at(F.expr(f"map({maps})"), F.col(table_column))


def masked_data_map(data: Column, methods: Column, known: Column, salt: str, spare: bool = False) -> Column:
    """Mask the PII entries of a DMS `data` map (column -> text). `methods`: a column of the row's
    table's PII methods (`pii_methods`); `known`: a column, whether the row's table is configured.
    `spare`: the rows carry `_prehashed`, whose columns `hash` keeps as they are.

    The lambdas run interpreted, once per entry, so each looks up only the row's few PII columns (a
    lookup of `<table>|<column>` in every table's PII, three an entry, cost ~5% of the tasks' CPU on
    the sample tables). Unknown tables get every value redacted: their PII columns are not known, so
    nothing from them is trusted.
    """

    def mask_entry(k: Column, v: Column) -> Column:
        method = methods[k]
        return (
            F.when(~known, F.when(v.isNull(), v).otherwise(F.lit(REDACTED)))
            .when(method == "hash", mask_column(v, "hash", salt, prehashed(k) if spare else None))
            .when(method == "redact", mask_column(v, "redact", salt))
            .otherwise(v)
        )

    # `drop` columns leave the map entirely. A configured table without PII keeps its map as it is.
    masked = F.map_filter(F.transform_values(data, mask_entry), lambda k, v: F.coalesce(methods[k], F.lit("")) != "drop")
    return F.when(known & methods.isNull(), data).otherwise(masked)
