"""Load and validate configs/pipeline.yaml plus configs/tables/*.yaml, reporting every problem at once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cdcflow.config.functions import add_config_path, check_params, load_function
from cdcflow.config.models import (
    IDENTIFIER,
    RULE_TYPES,
    STAGES,
    CompactionThresholds,
    PipelineConfig,
    TableConfig,
)
from cdcflow.errors import ConfigError, ConfigProblem

try:  # the C loader is ~10x faster, which keeps 1000 table files well under the 2 s budget
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

# ${VAR}, ${VAR:-default} (unset or empty -> default) and ${VAR-default} (unset -> default), as in bash.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")
DEFAULT_CONFIG_DIR = Path("configs")


@dataclass(frozen=True)
class Table:
    """A table config with pipeline defaults applied: what the jobs use."""

    cfg: TableConfig
    file: str
    ordering: tuple[str, ...]
    deletes: str
    target_file_size_mb: int
    tombstone_retention_hours: int
    delta_properties: dict[str, str] = field(default_factory=dict)  # silver's table properties
    writer: str = "auto"  # auto | spark | delta-rs (cdcflow.cdc.apply.silver_writer)
    delta_rs_max_table_mb: int = 1024
    compaction: CompactionThresholds = field(default_factory=CompactionThresholds)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def schema(self) -> str:
        return self.cfg.source.schema_

    @property
    def table(self) -> str:
        return self.cfg.source.table

    @property
    def primary_key(self) -> list[str]:
        return list(self.cfg.primary_key)

    @property
    def columns(self) -> dict[str, str]:
        return {name: col.type for name, col in self.cfg.columns.items()}

    @property
    def pii(self) -> dict[str, str]:
        return {name: col.pii for name, col in self.cfg.columns.items() if col.pii}

    @property
    def delta_path(self) -> str:
        return self.cfg.delta.path or f"silver/{self.schema}/{self.table}"


@dataclass(frozen=True)
class Project:
    pipeline: PipelineConfig
    tables: dict[str, Table]
    config_dir: Path
    pipeline_file: str = ""
    warnings: list[str] = field(default_factory=list)

    def table(self, name: str) -> Table:
        return self.tables[name]

    def path(self, relative_or_uri: str) -> str:
        """Resolve a lake-relative path against lake.root (local paths are made absolute)."""
        if "://" in relative_or_uri or relative_or_uri.startswith("/"):
            return relative_or_uri
        return join_uri(self.lake_root, relative_or_uri)

    @property
    def lake_root(self) -> str:
        return absolute_uri(self.pipeline.lake.root)

    @property
    def checkpoint_root(self) -> str:
        return absolute_uri(self.pipeline.checkpoints.root)


def absolute_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


# ---------------------------------------------------------------- interpolation


def interpolate(value: Any, file: str, path: str, problems: list[ConfigProblem], env: dict[str, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string value; a missing VAR without default is a problem."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            var, op, default = m.group(1), m.group(2), m.group(3)
            if var in env and (env[var] != "" or op == "-"):
                return env[var]
            if op is not None:
                return default
            problems.append(ConfigProblem(file, path, f"environment variable {var} is not set and has no default"))
            return ""

        return _VAR.sub(repl, value) if "${" in value else value
    if isinstance(value, dict):
        return {k: interpolate(v, file, f"{path}.{k}" if path else str(k), problems, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, file, f"{path}[{i}]", problems, env) for i, v in enumerate(value)]
    return value


def _read_yaml(path: Path, problems: list[ConfigProblem], env: dict[str, str]) -> dict[str, Any] | None:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        problems.append(ConfigProblem(str(path), where, f"invalid YAML: {getattr(e, 'problem', e)}"))
        return None
    except OSError as e:
        problems.append(ConfigProblem(str(path), "", f"cannot read: {e.strerror}"))
        return None
    if not isinstance(data, dict):
        problems.append(ConfigProblem(str(path), "", "expected a mapping at the top level"))
        return None
    return interpolate(data, str(path), "", problems, env)


def _pydantic_problems(file: str, err: ValidationError) -> list[ConfigProblem]:
    out = []
    for e in err.errors(include_url=False):
        path = ""
        prev: object = None
        for part in e["loc"]:
            # A discriminated union adds the rule tag after the list index (raw_to_staging.0.not_null); drop it.
            if isinstance(prev, int) and part in RULE_TYPES or str(part).startswith("function-after"):
                continue
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
            prev = part
        path = path.replace("schema_", "schema")
        reason = e["msg"]
        if e["type"] == "extra_forbidden":
            reason = "unknown key"
        elif e["type"] == "union_tag_invalid":
            reason = f"unknown rule type {e['input'].get('rule')!r}; expected one of {e['ctx']['expected_tags']}"
        elif e["type"] == "union_tag_not_found":
            reason = "missing the 'rule' key naming the rule type"
        out.append(ConfigProblem(file, path, reason))
    return out


# ---------------------------------------------------------------- cross checks


def _check_table(t: TableConfig, file: str, all_names: set[str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    declared = set(t.columns)

    def need(col: str, path: str) -> None:
        if col not in declared:
            problems.append(ConfigProblem(file, path, f"column {col!r} is not declared in columns"))

    for i, k in enumerate(t.primary_key):
        need(k, f"primary_key[{i}]")
    for k in t.primary_key:
        if k in t.columns and t.columns[k].pii == "drop":
            problems.append(ConfigProblem(file, f"columns.{k}.pii", "a primary key column cannot be dropped"))
    for stage in STAGES:
        for i, rule in enumerate(t.quality.stage(stage)):
            for col in rule.columns_used():
                need(col, f"quality.{stage}[{i}]")
            if rule.rule == "referential" and ".".join(rule.references.split(".")[:2]) not in all_names:
                problems.append(
                    ConfigProblem(file, f"quality.{stage}[{i}].references", f"no table {rule.references!r} is configured")
                )
        tr = getattr(t.transforms, stage)
        for col in tr.uses:
            need(col, f"transforms.{stage}.uses")
        for col in tr.rename:
            need(col, f"transforms.{stage}.rename.{col}")
        problems += _check_transforms(t, file, stage)
    for col in t.delta.partition_by:
        need(col, "delta.partition_by")
    for col in t.delta.zorder_by:
        need(col, "delta.zorder_by")
    wh = t.warehouse
    if wh:
        problems += _check_derived(t, file)
        stored = declared | set(wh.columns)

        def stores(col: str, path: str) -> None:
            if col not in stored:
                problems.append(ConfigProblem(file, path, f"column {col!r} is not declared in columns "
                                              "or warehouse.columns"))

        for col in wh.tracked_columns or []:
            stores(col, "warehouse.tracked_columns")
        for col in wh.scd1_columns:
            stores(col, "warehouse.scd1_columns")
        for col in [wh.dist_key] if wh.dist_key else []:
            stores(col, "warehouse.dist_key")
        for col in wh.sort_keys:
            stores(col, "warehouse.sort_keys")
        if wh.event_time_column:
            need(wh.event_time_column, "warehouse.event_time_column")
        for i, lk in enumerate(wh.lookups):
            need(lk.column, f"warehouse.lookups[{i}].column")
            if lk.dimension not in all_names:
                problems.append(
                    ConfigProblem(file, f"warehouse.lookups[{i}].dimension", f"no table {lk.dimension!r} is configured")
                )
    return problems


def _check_derived(t: TableConfig, file: str) -> list[ConfigProblem]:
    """`warehouse.columns` are what the warehouse stages' transforms add: each must be produced by one
    (a `columns` entry, a rename, a function's `outputs`, or a stage with SQL, which `cdcflow validate`
    runs), and a warehouse-stage `columns` entry that adds a name the warehouse doesn't store is an
    error, not a value silently computed and dropped."""
    problems: list[ConfigProblem] = []
    stages = ("staging_to_dimension",) if t.warehouse.kind == "dimension" else ("staging_to_dimension", "dimension_to_fact")
    produced: set[str] = set()
    any_sql = False
    for stage in stages:
        tr = getattr(t.transforms, stage)
        produced |= set(tr.columns) | set(tr.rename.values()) | {c for step in tr.functions for c in step.outputs}
        any_sql = any_sql or bool(tr.sql)
        added = [(f"transforms.{stage}.columns.{col}", col) for col in tr.columns]
        added += [(f"transforms.{stage}.rename.{old}", new) for old, new in tr.rename.items()
                  if old not in t.primary_key]  # a key's rename is an error of its own
        added += [(f"transforms.{stage}.functions[{i}].outputs", col)
                  for i, step in enumerate(tr.functions) for col in step.outputs]
        for where, col in added:
            if col not in t.columns and col not in t.warehouse.columns and not col.startswith("_"):
                problems.append(ConfigProblem(file, where, f"adds column {col!r}, which the warehouse table doesn't "
                                              "store: give its type in warehouse.columns"))
    for col in t.warehouse.columns:
        where = f"warehouse.columns.{col}"
        if col in t.columns:
            problems.append(ConfigProblem(file, where, "is a declared column (warehouse.columns are the ones the "
                                          "warehouse stages' transforms add)"))
        elif col.startswith("_") or not IDENTIFIER.match(col):
            problems.append(ConfigProblem(file, where, "is not a valid column name (names starting with _ are "
                                          "change metadata)"))
        elif col not in produced and not any_sql:
            problems.append(ConfigProblem(file, where, "no warehouse stage transform produces it (a `columns` "
                                          "entry, a rename or a function's outputs in "
                                          f"{' / '.join('transforms.' + s for s in stages)})"))
    return problems


def _check_transforms(t: TableConfig, file: str, stage: str) -> list[ConfigProblem]:
    """Key and ordering columns can't be transformed away: the apply, the sequence guard and the
    warehouse merge need them as the source gave them. DataFrame functions must import and be callable
    (their output columns are checked on a sample frame by `cdcflow validate`, cdcflow.transform_check)."""
    problems: list[ConfigProblem] = []
    tr = getattr(t.transforms, stage)
    keys = set(t.primary_key)
    where = f"transforms.{stage}"
    for old, new in tr.rename.items():
        if old in keys:
            problems.append(ConfigProblem(file, f"{where}.rename.{old}", "a primary key column cannot be renamed"))
        elif stage == "raw_to_staging" and old not in tr.columns and not (tr.sql or tr.functions):
            # silver stores the declared columns; SQL or a function could bring the name back, which
            # the check on a sample frame (cdcflow.transform_check) sees before a job reads anything
            problems.append(ConfigProblem(file, f"{where}.rename.{old}", f"silver keeps the declared column {old}: "
                                          f"derive {new} with a `columns` entry, or rename in a later stage"))
        if new.startswith("_"):
            problems.append(ConfigProblem(file, f"{where}.rename.{old}", "a column cannot be renamed to a name "
                                          "starting with _ (ordering and change metadata)"))
    for col in tr.columns:
        if col in keys:
            problems.append(ConfigProblem(file, f"{where}.columns.{col}", "a primary key column cannot be replaced"))
        elif col.startswith("_"):
            problems.append(ConfigProblem(file, f"{where}.columns.{col}",
                                          "columns starting with _ (ordering and change metadata) cannot be replaced"))
    for i, step in enumerate(tr.functions):
        try:
            check_params(load_function(step.function), step.function, step.params)
        except ValueError as e:
            problems.append(ConfigProblem(file, f"{where}.functions[{i}].function", str(e)))
    return problems


# ---------------------------------------------------------------- entry point


def load_project(config_dir: str | Path = DEFAULT_CONFIG_DIR, env: dict[str, str] | None = None) -> Project:
    """Load pipeline.yaml and every table file; raise ConfigError listing every problem found."""
    env = dict(os.environ) if env is None else env
    config_dir = Path(config_dir)
    problems: list[ConfigProblem] = []
    pipeline_file = config_dir / "pipeline.yaml"
    if not pipeline_file.exists():
        raise ConfigError([ConfigProblem(str(pipeline_file), "", "file not found")])

    raw = _read_yaml(pipeline_file, problems, env)
    pipeline: PipelineConfig | None = None
    if raw is not None:
        try:
            pipeline = PipelineConfig.model_validate(raw)
        except ValidationError as e:
            problems.extend(_pydantic_problems(str(pipeline_file), e))
    if pipeline is None:
        raise ConfigError(problems)

    tables_dir = config_dir / pipeline.tables_dir
    files = sorted(tables_dir.glob("*.yaml")) + sorted(tables_dir.glob("*.yml"))
    if not files:
        problems.append(ConfigProblem(str(tables_dir), "", "no table config files (*.yaml) found"))

    parsed: list[tuple[TableConfig, str]] = []
    seen: dict[str, str] = {}
    declared_names: set[str] = set()  # includes tables whose file has errors, to avoid cascading reports
    for f in files:
        data = _read_yaml(f, problems, env)
        if data is None:
            continue
        src = data.get("source")
        if isinstance(src, dict):
            declared_names.add(f"{src.get('schema')}.{src.get('table')}")
        try:
            t = TableConfig.model_validate(data)
        except ValidationError as e:
            problems.extend(_pydantic_problems(str(f), e))
            continue
        if t.name in seen:
            problems.append(ConfigProblem(str(f), "source", f"duplicate table {t.name!r}, also defined in {seen[t.name]}"))
            continue
        expected = f"{t.name}.yaml"
        if f.name not in (expected, f"{t.name}.yml"):
            problems.append(ConfigProblem(str(f), "source", f"file name should be {expected} to match source"))
        seen[t.name] = str(f)
        parsed.append((t, str(f)))

    if any(getattr(t.transforms, stage).functions for t, _ in parsed for stage in STAGES):
        add_config_path(config_dir)
    for t, f in parsed:
        problems.extend(_check_table(t, f, declared_names))
    if problems:
        raise ConfigError(problems)

    d = pipeline.defaults
    tables = {
        t.name: Table(
            cfg=t,
            file=f,
            ordering=tuple(t.ordering or d.ordering),
            deletes=t.deletes or d.deletes,
            target_file_size_mb=t.delta.target_file_size_mb or d.target_file_size_mb,
            tombstone_retention_hours=(
                t.delta.tombstone_retention_hours
                if t.delta.tombstone_retention_hours is not None
                else d.tombstone_retention_hours
            ),
            delta_properties={**d.delta_properties, **t.delta.properties},
            writer=t.delta.writer or d.writer,
            delta_rs_max_table_mb=d.delta_rs_max_table_mb,
            compaction=d.compaction.model_copy(update=t.delta.compaction.model_dump(exclude_none=True)),
        )
        for t, f in parsed
    }
    from cdcflow import storage  # the lake's S3 settings for Spark's S3A and delta-rs (one place)

    storage.use(pipeline.aws)
    return Project(pipeline=pipeline, tables=tables, config_dir=config_dir, pipeline_file=str(pipeline_file))
