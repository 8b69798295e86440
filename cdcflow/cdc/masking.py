"""PII masking, applied before anything is written or logged (docs/design.md).

hash: sha256 hex of salt + "|" + value; redact: "[REDACTED]"; drop: the column is removed.
"""

from __future__ import annotations

import hashlib
import os

from pyspark.sql import Column
from pyspark.sql import functions as F

from cdcflow.config import Project
from cdcflow.errors import UserError

REDACTED = "[REDACTED]"
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


def mask_column(col: Column, method: str, salt: str) -> Column:
    text = col.cast("string")
    if method == "hash":
        return F.when(text.isNull(), F.lit(None).cast("string")).otherwise(
            F.sha2(F.concat(F.lit(salt + "|"), text), 256)
        )
    if method == "redact":
        return F.when(text.isNull(), F.lit(None).cast("string")).otherwise(F.lit(REDACTED))
    raise ValueError(method)


def masked_data_map(data: Column, table: Column, project: Project, salt: str) -> Column:
    """Mask the PII entries of a DMS `data` map (column -> text) using one map lookup per entry.

    One literal map of "<table>|<column>" -> method serves every configured table, so the cost
    doesn't grow with the number of tables. Unknown tables get every value redacted: their PII
    columns are not known, so nothing from them is trusted.
    """
    pii = {f"{t.name}|{c}": m for t in project.tables.values() for c, m in t.pii.items()}
    known = list(project.tables)
    pii_map = F.create_map(*[F.lit(x) for kv in pii.items() for x in kv]) if pii else None

    def mask_entry(k: Column, v: Column) -> Column:
        method = pii_map[F.concat(table, F.lit("|"), k)] if pii_map is not None else F.lit(None)
        return (
            F.when(~table.isin(known), F.when(v.isNull(), v).otherwise(F.lit(REDACTED)))
            .when(method == "hash", mask_column(v, "hash", salt))
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
