"""Typed configuration: configs/pipeline.yaml and one configs/tables/<schema>.<table>.yaml per table.

Every model forbids unknown keys, so a typo is reported with its key path instead of being ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Severity = Literal["quarantine", "warn", "fail"]
Stage = Literal["raw_to_staging", "staging_to_dimension", "dimension_to_fact"]
STAGES: tuple[str, ...] = ("raw_to_staging", "staging_to_dimension", "dimension_to_fact")

# Ordering components a table may use to build its total per-key sequence (see cdcflow.cdc.sequence).
OrderingKey = Literal["commit_timestamp", "transaction_id", "transaction_record_id", "stream_position", "change_seq"]

_SIMPLE_TYPES = {"string", "int", "bigint", "smallint", "double", "float", "boolean", "date", "timestamp"}
_DECIMAL = re.compile(r"^decimal\((\d{1,2}),\s*(\d{1,2})\)$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_column_type(value: str) -> str:
    value = value.strip().lower()
    m = _DECIMAL.match(value)
    if value in _SIMPLE_TYPES or (m and int(m.group(2)) <= int(m.group(1)) <= 38):
        return value
    raise ValueError(f"unknown column type {value!r}; use one of {sorted(_SIMPLE_TYPES)} or decimal(p,s)")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- table config


class Column(Strict):
    type: str
    nullable: bool = True
    # PII masking applied before anything is written or logged: salted sha-256, fixed redaction, or drop.
    pii: Literal["hash", "redact", "drop"] | None = None

    _check_type = field_validator("type")(classmethod(lambda cls, v: check_column_type(v)))


class RuleBase(Strict):
    name: str | None = None
    severity: Severity = "quarantine"
    # With severity=fail: the run fails when failing_rows / rows exceeds this ratio.
    fail_threshold: float = Field(default=0.0, ge=0.0, le=1.0)

    def columns_used(self) -> list[str]:
        return []

    @property
    def rule_name(self) -> str:
        return self.name or self.rule  # type: ignore[attr-defined]


class NotNullRule(RuleBase):
    rule: Literal["not_null"]
    columns: list[str] = Field(min_length=1)

    def columns_used(self) -> list[str]:
        return list(self.columns)


class ValidDateRule(RuleBase):
    rule: Literal["valid_date"]
    column: str
    min: str | None = None  # ISO date or timestamp
    max: str | None = None  # ISO date/timestamp, or "now" (+ optional slack like "now+1d")
    format: str | None = None  # Spark datetime pattern when the column is a string

    def columns_used(self) -> list[str]:
        return [self.column]


class RangeRule(RuleBase):
    rule: Literal["range"]
    column: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> RangeRule:
        if self.min is None and self.max is None:
            raise ValueError("a range rule needs min, max or both")
        return self

    def columns_used(self) -> list[str]:
        return [self.column]


class AcceptedValuesRule(RuleBase):
    rule: Literal["accepted_values"]
    column: str
    values: list[str | int | float | bool] = Field(min_length=1)

    def columns_used(self) -> list[str]:
        return [self.column]


class RegexRule(RuleBase):
    rule: Literal["regex"]
    column: str
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
        return v

    def columns_used(self) -> list[str]:
        return [self.column]


class UniqueRule(RuleBase):
    rule: Literal["unique"]
    columns: list[str] = Field(min_length=1)

    def columns_used(self) -> list[str]:
        return list(self.columns)


class ReferentialRule(RuleBase):
    rule: Literal["referential"]
    column: str
    references: str  # "<schema>.<table>.<column>" of another configured table

    @field_validator("references")
    @classmethod
    def _shape(cls, v: str) -> str:
        if v.count(".") != 2:
            raise ValueError("references must look like <schema>.<table>.<column>")
        return v

    def columns_used(self) -> list[str]:
        return [self.column]


class ExpressionRule(RuleBase):
    rule: Literal["expression"]
    expression: str  # Spark SQL boolean expression that must hold for a good row
    columns: list[str] = Field(default_factory=list)  # columns it reads, checked at load time

    def columns_used(self) -> list[str]:
        return list(self.columns)


Rule = Annotated[
    NotNullRule | ValidDateRule | RangeRule | AcceptedValuesRule | RegexRule | UniqueRule | ReferentialRule
    | ExpressionRule,
    Field(discriminator="rule"),
]


RULE_TYPES = frozenset(
    {"not_null", "valid_date", "range", "accepted_values", "regex", "unique", "referential", "expression"}
)


class Quality(Strict):
    raw_to_staging: list[Rule] = Field(default_factory=list)
    staging_to_dimension: list[Rule] = Field(default_factory=list)
    dimension_to_fact: list[Rule] = Field(default_factory=list)

    def stage(self, stage: str) -> list[Rule]:
        return list(getattr(self, stage))


FUNCTION_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class TransformFunction(Strict):
    """A DataFrame-API transform: `module:function`, called as function(df, **params) -> DataFrame.
    The module comes from a package shipped beside the configs (the config folder is on sys.path)."""

    function: str
    params: dict[str, object] = Field(default_factory=dict)
    # Columns the function's output must have (checked by `cdcflow validate` on a sample frame).
    outputs: list[str] = Field(default_factory=list)

    @field_validator("function")
    @classmethod
    def _shape(cls, v: str) -> str:
        if not FUNCTION_REF.match(v):
            raise ValueError(f"{v!r} is not module:function (e.g. shop_transforms:normalise_names)")
        return v


class StageTransforms(Strict):
    # New or replaced columns: name -> Spark SQL expression over the row.
    columns: dict[str, str] = Field(default_factory=dict)
    rename: dict[str, str] = Field(default_factory=dict)
    # Spark SQL statements run in order over the view named `input`; the last one is the output.
    sql: list[str] = Field(default_factory=list)
    # DataFrame-API functions run in order after the SQL statements.
    functions: list[TransformFunction] = Field(default_factory=list)
    # Columns that the expressions read, checked against the declared columns at load time.
    uses: list[str] = Field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.columns or self.rename or self.sql or self.functions)


class Transforms(Strict):
    raw_to_staging: StageTransforms = Field(default_factory=StageTransforms)
    staging_to_dimension: StageTransforms = Field(default_factory=StageTransforms)
    dimension_to_fact: StageTransforms = Field(default_factory=StageTransforms)


# Silver is updated in place, so properties that forbid updates can't be set.
_FORBIDDEN_PROPERTIES = {"delta.appendonly"}
_PROPERTY_KEY = re.compile(r"^delta\.[A-Za-z0-9_.-]+$")


def check_delta_properties(value: dict[str, str | bool | int]) -> dict[str, str]:
    """Delta table properties (`delta.enableDeletionVectors: true`, ...), as Delta's strings."""
    out: dict[str, str] = {}
    for key, v in value.items():
        if not _PROPERTY_KEY.match(key):
            raise ValueError(f"{key!r} is not a Delta table property (they start with 'delta.')")
        if key.lower() in _FORBIDDEN_PROPERTIES:
            raise ValueError(f"{key!r} can't be set: silver tables are updated in place")
        out[key] = str(v).lower() if isinstance(v, bool) else str(v)
        if "'" in out[key] or "\\" in out[key]:  # the value is quoted in ALTER TABLE ... SET TBLPROPERTIES
            raise ValueError(f"{key!r}: quotes and backslashes are not allowed in a property value")
    return out


class CompactionThresholds(Strict):
    """When `cdcflow compact` rewrites a table (or bronze partition): at least `min_small_files` files
    under `small_file_mb`, and those at least `small_file_share` of its files. Others are skipped
    without reading their data (the Delta log has every file's size)."""

    small_file_mb: int = Field(default=32, gt=0)
    min_small_files: int = Field(default=8, ge=1)
    small_file_share: float = Field(default=0.2, ge=0, le=1)


class CompactionOverride(Strict):
    small_file_mb: int | None = Field(default=None, gt=0)
    min_small_files: int | None = Field(default=None, ge=1)
    small_file_share: float | None = Field(default=None, ge=0, le=1)


class DeltaTarget(Strict):
    path: str | None = None  # relative to lake.root; default silver/<schema>/<table>
    partition_by: list[str] = Field(default_factory=list)
    zorder_by: list[str] = Field(default_factory=list)
    target_file_size_mb: int | None = Field(default=None, gt=0)
    tombstone_retention_hours: int | None = Field(default=None, ge=0)
    writer: Literal["auto", "spark", "delta-rs"] | None = None  # who commits silver (defaults.writer)
    compaction: CompactionOverride = Field(default_factory=CompactionOverride)  # over defaults.compaction
    # Table properties of silver, over the pipeline's defaults.delta_properties.
    properties: dict[str, str | bool | int] = Field(default_factory=dict)

    _check_properties = field_validator("properties")(classmethod(lambda cls, v: check_delta_properties(v)))


class FactLookup(Strict):
    dimension: str  # "<schema>.<table>" of a dimension table
    column: str  # fact column holding the dimension's natural key
    surrogate_column: str  # fact column receiving the dimension surrogate key


class WarehouseTarget(Strict):
    staging_table: str | None = None
    table: str | None = None
    kind: Literal["dimension", "fact"] = "dimension"
    scd_type: Literal[1, 2] = 2
    tracked_columns: list[str] | None = None  # default: every non-key column
    scd1_columns: list[str] = Field(default_factory=list)
    event_time_column: str | None = None  # facts: point-in-time dimension lookup uses this column
    lookups: list[FactLookup] = Field(default_factory=list)
    dist_key: str | None = None
    sort_keys: list[str] = Field(default_factory=list)
    # Columns the warehouse stages' transforms add (name -> type), stored after the declared ones:
    # without a type here a derived column is computed and not stored.
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("columns")
    @classmethod
    def _column_types(cls, v: dict[str, str]) -> dict[str, str]:
        return {name: check_column_type(ty) for name, ty in v.items()}


class TableConfig(Strict):
    source: SourceRef
    columns: dict[str, Column] = Field(min_length=1)
    primary_key: list[str] = Field(min_length=1)
    ordering: list[OrderingKey] | None = None
    deletes: Literal["soft", "hard"] | None = None
    ignore_null_updates: bool = False
    quality: Quality = Field(default_factory=Quality)
    transforms: Transforms = Field(default_factory=Transforms)
    delta: DeltaTarget = Field(default_factory=DeltaTarget)
    warehouse: WarehouseTarget | None = None

    @property
    def name(self) -> str:
        return f"{self.source.schema_}.{self.source.table}"


class SourceRef(Strict):
    schema_: str = Field(alias="schema")
    table: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("schema_", "table")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not IDENTIFIER.match(v):
            raise ValueError(f"{v!r} is not a valid identifier")
        return v


TableConfig.model_rebuild()


# ---------------------------------------------------------------- pipeline config


class AwsSettings(Strict):
    endpoint_url: str | None = None  # emulator URL; empty means real AWS
    region: str = "us-east-1"

    @field_validator("endpoint_url")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None


class KinesisSettings(Strict):
    stream: str
    shards: int = Field(default=2, ge=1)
    starting_position: Literal["trim_horizon", "latest", "at_timestamp"] = "trim_horizon"
    starting_timestamp: str | None = None
    # Per shard and micro-batch (Glue: maxFetchRecordsPerShard), and per GetRecords call (Glue:
    # maxRecordPerRead; Kinesis allows 10,000). A job catching up needs the large per-batch limit.
    max_records_per_shard: int = Field(default=100000, ge=1)
    max_records_per_read: int = Field(default=10000, ge=1, le=10000)


class DmsSettings(Strict):
    raw_uri: str  # where DMS writes S3 Parquet: s3://bucket/prefix or a local directory
    archive_prefix: str = "archive"
    archive_expire_days: int = Field(default=90, ge=1)  # `cdcflow compact` deletes older archived raw files
    before_image_field: str = "before-image"  # BeforeImageSettings.FieldName of the DMS task


class LakeSettings(Strict):
    root: str  # local path or s3:// URI


class CheckpointSettings(Strict):
    root: str


class WarehouseSettings(Strict):
    kind: Literal["embedded", "postgres", "redshift"] = "embedded"
    url: str | None = None  # postgresql://... ; for redshift a redshift:// URL or empty + IAM
    schema_: str = Field(default="analytics", alias="schema")
    # Redshift staging loads: rows go to this S3 prefix as Parquet and Redshift COPYs them with this
    # role (it needs s3:GetObject there). Unset: multi-row INSERTs, for small batches only.
    s3_staging: str | None = None
    iam_role: str | None = None
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("s3_staging", "iam_role")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _s3_staging_needs_role(self) -> WarehouseSettings:
        if self.s3_staging and not self.s3_staging.startswith("s3://"):
            raise ValueError("s3_staging must be an s3:// prefix")
        if self.s3_staging and not self.iam_role:
            raise ValueError("s3_staging needs iam_role (the role Redshift assumes to read the staging files)")
        return self


class StreamingSettings(Strict):
    trigger_seconds: int = Field(default=5, ge=0)
    watermark_minutes: int = Field(default=10, ge=0)
    max_parallel_tables: int = Field(default=4, ge=1)
    table_retries: int = Field(default=3, ge=0)
    # The stream's DQ report (per table and raw->staging rule) is written once per this many minutes.
    dq_report_minutes: int = Field(default=60, ge=1)


class SparkSettings(Strict):
    shuffle_partitions: int = Field(default=2, ge=1)
    driver_memory: str = "2g"


class TableDefaults(Strict):
    ordering: list[OrderingKey] = Field(
        default_factory=lambda: ["commit_timestamp", "transaction_id", "transaction_record_id"]
    )
    deletes: Literal["soft", "hard"] = "soft"
    target_file_size_mb: int = Field(default=128, gt=0)
    tombstone_retention_hours: int = Field(default=168, ge=0)
    delta_properties: dict[str, str | bool | int] = Field(default_factory=dict)  # every silver table's
    # Who commits a silver table's changes: delta-rs (no JVM, ~15 ms a commit) while the table is at most
    # delta_rs_max_table_mb and has only features delta-rs writes; Spark MERGE above that ("auto").
    writer: Literal["auto", "spark", "delta-rs"] = "auto"
    delta_rs_max_table_mb: int = Field(default=1024, ge=0)
    compaction: CompactionThresholds = Field(default_factory=CompactionThresholds)
    # VACUUM never keeps less history than this (running streams and readers need it); `cdcflow compact
    # --vacuum-hours` below it is refused unless --allow-short-retention is given.
    vacuum_min_retention_hours: int = Field(default=168, ge=0)

    _check_properties = field_validator("delta_properties")(classmethod(lambda cls, v: check_delta_properties(v)))


class PiiSettings(Strict):
    salt_env: str = "CDCFLOW_PII_SALT"  # the salt comes from this env var (a secret in AWS), never the file


class PipelineConfig(Strict):
    name: str = "cdcflow"
    environment: Literal["local", "aws"] = "local"
    aws: AwsSettings = Field(default_factory=AwsSettings)
    kinesis: KinesisSettings
    dms: DmsSettings
    lake: LakeSettings
    checkpoints: CheckpointSettings
    warehouse: WarehouseSettings = Field(default_factory=WarehouseSettings)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    defaults: TableDefaults = Field(default_factory=TableDefaults)
    pii: PiiSettings = Field(default_factory=PiiSettings)
    tables_dir: str = "tables"  # relative to the pipeline file's folder
