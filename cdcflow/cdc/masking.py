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
from cdcflow.runtime import sql_in, sql_text

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


def masked_data_map(data: Column, table_column: str, project: Project, salt: str, spare: bool = False) -> Column:
    """Mask the PII entries of a DMS `data` map (column -> text) using one map lookup per entry.
    `table_column`: the rows' table name column. `spare`: the rows carry `_prehashed`, whose
    columns `hash` keeps as they are.

    One literal map of "<table>|<column>" -> method serves every configured table, so the plan
    doesn't grow with the number of tables; it and the configured tables' list are each one SQL
    expression (a JVM call per entry cost about 0.9 s of driver time a micro-batch at 1004 tables).
    Unknown tables get every value redacted: their PII columns are not known, so nothing from them
    is trusted.
    """
    pii = {f"{t.name}|{c}": m for t in project.tables.values() for c, m in t.pii.items()}
    table = F.col(table_column)
    known = sql_in(table_column, project.tables)
    pii_map = F.expr(f"map({', '.join(sql_text(x) for kv in pii.items() for x in kv)})") if pii else None

    def mask_entry(k: Column, v: Column) -> Column:
        method = pii_map[F.concat(table, F.lit("|"), k)] if pii_map is not None else F.lit(None)
        return (
            F.when(~known, F.when(v.isNull(), v).otherwise(F.lit(REDACTED)))
            .when(method == "hash", mask_column(v, "hash", salt, prehashed(k) if spare else None))
            .when(method == "redact", mask_column(v, "redact", salt))
            .otherwise(v)
        )

    masked = F.transform_values(data, mask_entry)
    if pii_map is None:
        return masked
    # `drop` columns leave the map entirely.
    return F.map_filter(
        masked, lambda k, v: F.coalesce(pii_map[F.concat(table, F.lit("|"), k)], F.lit("")) != "drop"
    )
