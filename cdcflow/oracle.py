"""The oracle: what the pipeline must produce, computed in plain Python from the simulator's true history.

It orders by the history's source order (never by delivery), so duplicates, reordering and late delivery
cannot change its answer. Semantics (docs/simulator.md):

- Current state per table: latest applied version per key; deletes leave a tombstone (`_is_deleted`).
  A primary-key change (update with `before`) deletes the old key and upserts the new one. An update of a
  key that has no live row is an upsert. With `ignore_null_updates`, an update keeps the previous value
  of every column it sets to NULL.
- A load/insert/update failing a raw_to_staging rule with severity `quarantine` is quarantined (first
  failing rule in config order) and not applied. Deletes are not checked (they carry keys only).
  Rules checked: not_null, range, accepted_values, regex, valid_date; unique, referential and expression
  are skipped at the raw stage. A `warn` failure is applied (and counted: `expected_dq`).
- `fail` rules (raw_to_staging) are judged per micro-batch; the oracle takes the whole history as ONE
  micro-batch (a test gives the stream one replay file, without duplicated deliveries): a table whose
  failing records / records (deletes included) pass a fail rule's threshold is isolated, so none of
  its changes is applied and every one of its records is quarantined under that rule.
- raw_to_staging transforms: the caller gives each table's transform as a plain Python function of
  the row (`transforms`, written from the transform's meaning, not by calling the product); it runs
  after the rules, before masking, on every applied row.
- SCD2 (warehouse dimensions with scd_type 2): one row per version of the tracked columns (NULL-safe
  change detection), valid_from/valid_to from source commit times (load versions: valid_from None), a
  delete closes the current row and marks it is_deleted, a re-insert opens a new version. Changes failing
  a staging_to_dimension quarantine rule are not versioned.
- Warehouse stages (`warehouse_row`): a change reaches the warehouse masked (bronze's values); each stage
  (staging_to_dimension; then dimension_to_fact for facts) drops it when one of its quarantine rules
  fails, else applies the caller's transform of that stage (`stage_transforms[(table, stage)]`, written
  from the transform's meaning like `transforms`).
- Facts (`expected_facts`): per key, the latest change the stages kept; a delete leaves a flagged
  tombstone (deletes are not checked), also for a key whose changes the stages all dropped.
- A warehouse stage's referential rule looks the value up among the referenced column's live rows in
  the expected silver state (`References`): the warehouse merge is taken to run once the stream has
  applied the whole history (a merge between micro-batches sees an earlier silver; tests of that drop
  the rule). At raw_to_staging, referential rules are skipped.
- Masking as docs/design.md: hash = sha256(salt + "|" + value), redact = "[REDACTED]", drop = absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cdcflow.config import Project, Table

LOCAL_SALT = "cdcflow-local-salt"
REDACTED = "[REDACTED]"
SCD_COLUMNS = ("valid_from", "valid_to", "is_current", "is_deleted")
Key = tuple


# ---------------------------------------------------------------- masking


def resolve_salt(project: Project, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    salt = env.get(project.pipeline.pii.salt_env)
    if salt:
        return salt
    if project.pipeline.environment == "local":
        return LOCAL_SALT
    raise ValueError(f"the PII salt env var {project.pipeline.pii.salt_env} is not set")


def mask_value(kind: str | None, value: Any, salt: str) -> Any:
    if value is None or kind is None:
        return value
    if kind == "hash":
        return hashlib.sha256(f"{salt}|{value}".encode()).hexdigest()
    if kind == "redact":
        return REDACTED
    raise ValueError(f"cannot mask with {kind!r}")


def mask_row(table: Table, row: dict[str, Any], salt: str) -> dict[str, Any]:
    """Declared columns in config order (masked, dropped ones absent), then any extra (drift) columns."""
    pii = table.pii
    out = {c: mask_value(pii.get(c), row.get(c), salt) for c in table.columns if pii.get(c) != "drop"}
    for c, v in row.items():
        if c not in table.columns and not c.startswith("_"):
            out[c] = v
    return out


# ---------------------------------------------------------------- data-quality rules


def _as_datetime(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v.astimezone(UTC).replace(tzinfo=None) if v.tzinfo else v
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    s = str(v).strip().replace("T", " ").removesuffix("Z")
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(s, fmt)
        except ValueError:
            continue
    return None


def _bound(text: str | None) -> datetime | None:
    if text is None:
        return None
    m = re.fullmatch(r"now(?:([+-])(\d+)([dh]))?", text.strip())
    if m:
        now = datetime.now(UTC).replace(tzinfo=None)
        if m.group(1):
            delta = timedelta(days=int(m.group(2))) if m.group(3) == "d" else timedelta(hours=int(m.group(2)))
            now = now + delta if m.group(1) == "+" else now - delta
        return now
    return _as_datetime(text)


# (referenced table, column) -> the column's values in the table's live silver rows, as text
References = dict[tuple[str, str], set[str]]


def rule_fails(rule: Any, row: dict[str, Any], references: References | None = None) -> bool:
    kind = rule.rule
    if kind == "referential" and references is not None:
        v = row.get(rule.column)
        return v is not None and str(v) not in references.get(tuple(rule.references.rsplit(".", 1)), set())
    if kind == "not_null":
        return any(row.get(c) is None for c in rule.columns)
    if kind in ("unique", "referential", "expression"):
        return False
    v = row.get(rule.column)
    if v is None:
        return False
    if kind == "range":
        try:
            n = Decimal(str(v))
        except InvalidOperation:
            return True
        return (rule.min is not None and n < Decimal(str(rule.min))) or (
            rule.max is not None and n > Decimal(str(rule.max)))
    if kind == "accepted_values":
        return v not in rule.values and str(v) not in {str(x) for x in rule.values}
    if kind == "regex":
        return re.search(rule.pattern, str(v)) is None
    if kind == "valid_date":
        d = _as_datetime(v)
        lo, hi = _bound(rule.min), _bound(rule.max)
        return d is None or (lo is not None and d < lo) or (hi is not None and d > hi)
    raise ValueError(f"unknown rule {kind!r}")


def failing_rule(table: Table, row: dict[str, Any], stage: str = "raw_to_staging",
                 references: References | None = None) -> str | None:
    """The first quarantine-severity rule of `stage` the row breaks (its name or type), or None."""
    for rule in table.cfg.quality.stage(stage):
        if rule.severity == "quarantine" and rule_fails(rule, row, references):
            return rule.rule_name
    return None


# ---------------------------------------------------------------- history


@dataclass
class HistoryData:
    changes: list[dict[str, Any]]
    manifest: dict[str, Any] = field(default_factory=dict)

    def faults(self, target: str = "kinesis") -> list[dict[str, Any]]:
        return list(self.manifest.get("faults", {}).get(target, []))


def load_history(history_dir: str | Path) -> HistoryData:
    d = Path(history_dir)
    changes = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines() if line.strip()]
    manifest = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
    return HistoryData(changes, manifest)


@dataclass
class Event:
    """One change as applied to a table: an upsert of `row` or a delete of `key`."""

    table: str
    kind: str  # upsert | delete
    key: Key
    row: dict[str, Any]
    commit_ts: str | None
    source_seq: int


def _key(table: Table, data: dict[str, Any]) -> Key:
    return tuple(data.get(c) for c in table.primary_key)


DATA_OPS = ("load", "insert", "update", "delete")
RowTransform = Callable[[dict[str, Any]], dict[str, Any]]


def isolated_tables(project: Project, changes: list[dict[str, Any]]) -> dict[str, str]:
    """table -> the raw_to_staging `fail` rule that isolates it, the history being one micro-batch."""
    out: dict[str, str] = {}
    for t in project.tables.values():
        fail_rules = [r for r in t.cfg.quality.raw_to_staging if r.severity == "fail"]
        records = [ch for ch in changes if ch["table"] == t.name and ch["op"] in DATA_OPS] if fail_rules else []
        for rule in fail_rules:
            n = sum(1 for ch in records if ch["op"] != "delete" and rule_fails(rule, ch.get("data") or {}))
            if records and n / len(records) > rule.fail_threshold:
                out[t.name] = rule.rule_name
                break
    return out


def applied_events(project: Project, changes: list[dict[str, Any]],
                   transforms: dict[str, RowTransform] | None = None) -> Iterator[Event]:
    """The source history as upserts/deletes per table, in source order, skipping quarantined changes
    and isolated tables.

    Upsert rows are the full raw (unmasked) rows, transformed (`transforms`), after applying
    ignore_null_updates."""
    live: dict[str, dict[Key, dict[str, Any]]] = {}
    isolated = isolated_tables(project, changes)
    for ch in sorted(changes, key=lambda c: c["source_seq"]):
        t = project.tables.get(ch["table"])
        op = ch["op"]
        if t is None or op not in DATA_OPS or t.name in isolated:
            continue
        rows = live.setdefault(t.name, {})
        data = dict(ch.get("data") or {})
        seq, ts = ch["source_seq"], ch.get("commit_ts")
        if op == "delete":
            key = _key(t, data)
            rows.pop(key, None)
            yield Event(t.name, "delete", key, data, ts, seq)
            continue
        if failing_rule(t, data) is not None:
            continue
        if transforms and t.name in transforms:
            data = transforms[t.name](data)
        key = _key(t, data)
        before = ch.get("before")
        if op == "update" and before:
            old = tuple(before.get(c) for c in t.primary_key)
            if old != key:
                rows.pop(old, None)
                yield Event(t.name, "delete", old, {**data, **before}, ts, seq)
        prev = rows.get(key)
        if op == "update" and t.cfg.ignore_null_updates and prev is not None:
            row = dict(prev)
            row.update({c: v for c, v in data.items() if v is not None})
        else:
            row = data
        rows[key] = row
        yield Event(t.name, "upsert", key, row, ts, seq)


# ---------------------------------------------------------------- expectations


def expected_state(project: Project, changes: list[dict[str, Any]], salt: str,
                   transforms: dict[str, RowTransform] | None = None) -> dict[str, dict[Key, dict[str, Any]]]:
    """table -> key -> expected silver row (masked, drift columns included, `_is_deleted`)."""
    out: dict[str, dict[Key, dict[str, Any]]] = {name: {} for name in project.tables}
    drift: dict[str, list[str]] = {}
    for ch in changes:
        # Silver keeps every column it ever had: a renamed column is a new one; a dropped one stays.
        if ch["op"] in ("add-column", "rename-column") and ch["table"] in project.tables:
            drift.setdefault(ch["table"], []).append(ch["data"]["column"])
    for ev in applied_events(project, changes, transforms):
        t = project.tables[ev.table]
        state = out[ev.table]
        if ev.kind == "upsert":
            row = {**{c: None for c in drift.get(ev.table, [])}, **ev.row}
            state[ev.key] = {**mask_row(t, row, salt), "_is_deleted": False}
        else:
            prev = state.get(ev.key)
            base = dict(prev) if prev else {c: None for c in mask_row(t, {}, salt)}
            if t.deletes == "hard" or prev is None:
                base = {c: None for c in base}
            base.update(dict(zip(t.primary_key, ev.key, strict=True)))
            base["_is_deleted"] = True
            base["_deleted_at"] = ev.commit_ts  # silver's column: compaction GCs hard tombstones by it
            state[ev.key] = base
    return out


def scd2_tables(project: Project) -> list[Table]:
    return [t for t in project.tables.values()
            if t.cfg.warehouse and t.cfg.warehouse.kind == "dimension" and t.cfg.warehouse.scd_type == 2]


def fact_tables(project: Project) -> list[Table]:
    return [t for t in project.tables.values() if t.cfg.warehouse and t.cfg.warehouse.kind == "fact"]


StageTransforms = dict[tuple[str, str], RowTransform]  # (table, warehouse stage) -> row transform


def live_references(project: Project, state: dict[str, dict[Key, dict[str, Any]]]) -> References:
    """What the warehouse stages' referential rules look up, from the expected silver `state`."""
    out: References = {}
    for t in project.tables.values():
        for stage in ("staging_to_dimension", "dimension_to_fact"):
            for rule in t.cfg.quality.stage(stage):
                if rule.rule == "referential":
                    table, column = rule.references.rsplit(".", 1)
                    out[(table, column)] = {str(r[column]) for r in state.get(table, {}).values()
                                            if not r.get("_is_deleted") and r.get(column) is not None}
    return out


def warehouse_row(t: Table, row: dict[str, Any], salt: str, stage_transforms: StageTransforms | None = None,
                  references: References | None = None) -> dict[str, Any] | None:
    """A change's row as the warehouse stages hand it on, or None when a stage's quarantine rule takes
    it: masked, then per stage its rules (on the values the stage sees) and its transform."""
    out = mask_row(t, row, salt)
    stages = ("staging_to_dimension", "dimension_to_fact") if t.cfg.warehouse.kind == "fact" else ("staging_to_dimension",)
    for stage in stages:
        if failing_rule(t, out, stage, references) is not None:
            return None
        transform = (stage_transforms or {}).get((t.name, stage))
        out = transform(out) if transform else out
    return out


def tracked_columns(table: Table) -> list[str]:
    wh = table.cfg.warehouse
    cols = list(wh.tracked_columns) if wh and wh.tracked_columns else [c for c in table.columns if c not in table.primary_key]
    return [c for c in cols if table.pii.get(c) != "drop"]


def _same(a: Any, b: Any) -> bool:
    """NULL-safe equality: NULL = NULL, NULL != value."""
    return (a is None and b is None) or (a is not None and b is not None and a == b)


def expected_scd2(project: Project, changes: list[dict[str, Any]], salt: str,
                  transforms: dict[str, RowTransform] | None = None,
                  stage_transforms: StageTransforms | None = None,
                  references: References | None = None) -> dict[str, list[dict[str, Any]]]:
    """table -> SCD2 rows (key columns, tracked columns masked, valid_from, valid_to, is_current, is_deleted),
    per key in source order."""
    tables = {t.name: t for t in scd2_tables(project)}
    versions: dict[str, dict[Key, list[dict[str, Any]]]] = {name: {} for name in tables}
    for ev in applied_events(project, changes, transforms):
        t = tables.get(ev.table)
        if t is None:
            continue
        hist = versions[ev.table].setdefault(ev.key, [])
        cur = hist[-1] if hist and hist[-1]["is_current"] else None
        if ev.kind == "delete":
            if cur is not None:
                cur.update(valid_to=ev.commit_ts, is_current=False, is_deleted=True)
            continue
        masked = warehouse_row(t, ev.row, salt, stage_transforms, references)
        if masked is None:
            continue
        tracked = {c: masked.get(c) for c in tracked_columns(t)}
        if cur is not None and all(_same(cur[c], v) for c, v in tracked.items()):
            continue
        if cur is not None and cur["valid_from"] == ev.commit_ts:
            cur.update(tracked)  # two versions in one commit: the later one wins
            continue
        if cur is not None:
            cur.update(valid_to=ev.commit_ts, is_current=False)
        key_cols = dict(zip(t.primary_key, ev.key, strict=True))
        hist.append({**key_cols, **tracked, "valid_from": ev.commit_ts, "valid_to": None, "is_current": True,
                     "is_deleted": False})
    return {name: [r for hist in by_key.values() for r in hist] for name, by_key in versions.items()}


def expected_facts(project: Project, changes: list[dict[str, Any]], salt: str,
                   transforms: dict[str, RowTransform] | None = None,
                   stage_transforms: StageTransforms | None = None,
                   references: References | None = None) -> dict[str, dict[Key, dict[str, Any]]]:
    """fact table -> key -> expected fact row in `expected_state`'s shape: the latest change per key the
    warehouse stages kept (`warehouse_row`), or a tombstone (`_is_deleted`) after a delete."""
    tables = {t.name: t for t in fact_tables(project)}
    out: dict[str, dict[Key, dict[str, Any]]] = {name: {} for name in tables}
    for ev in applied_events(project, changes, transforms):
        t = tables.get(ev.table)
        if t is None:
            continue
        facts = out[ev.table]
        if ev.kind == "delete":  # a tombstone, also for a key the facts never held (the warehouse's insert)
            facts[ev.key] = {**dict(zip(t.primary_key, ev.key, strict=True)), "_is_deleted": True}
            continue
        row = warehouse_row(t, ev.row, salt, stage_transforms, references)
        if row is not None:  # the fact table holds the declared columns (not drift columns silver adds)
            facts[ev.key] = {**{c: v for c, v in row.items() if c in t.columns}, "_is_deleted": False}
    return out


def expected_quarantine(project: Project, changes: list[dict[str, Any]],
                        faults: list[dict[str, Any]]) -> dict[tuple[str | None, str], int]:
    """(table or None, rule) -> number of quarantine rows: quality failures plus injected bad records.
    An isolated table's records (its injected ones that reach the table too) are all under its fail rule."""
    out: dict[tuple[str | None, str], int] = {}
    isolated = isolated_tables(project, changes)
    for ch in changes:
        t = project.tables.get(ch["table"])
        if t is None or ch["op"] not in DATA_OPS:
            continue
        rule = isolated.get(t.name) or (failing_rule(t, ch.get("data") or {}) if ch["op"] != "delete" else None)
        if rule is not None:
            out[(t.name, rule)] = out.get((t.name, rule), 0) + 1
    for f in faults:
        if f.get("rule"):
            table = f.get("table")
            if table in isolated and f["rule"] in ("missing_primary_key", "type_mismatch", "no_ordering"):
                k = (table, isolated[table])
            else:
                k = (table, f["rule"])
            out[k] = out.get(k, 0) + 1
    return out


def expected_dq(project: Project, changes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The stream's DQ counts for the history as one micro-batch without delivery faults: table ->
    {"checked": records (deletes included), "rules": rule -> (severity, failed, quarantined)}. A
    quarantine rule's failures are the records it names (the first failing one); a warn / fail rule's
    every failing record; an isolated table's records are quarantined under its fail rule only."""
    isolated = isolated_tables(project, changes)
    out: dict[str, dict[str, Any]] = {}
    for ch in changes:
        t = project.tables.get(ch["table"])
        if t is None or ch["op"] not in DATA_OPS:
            continue
        entry = out.setdefault(t.name, {"checked": 0, "rules": {
            r.rule_name: [r.severity, 0, 0] for r in t.cfg.quality.raw_to_staging}})
        entry["checked"] += 1
        if t.name in isolated:
            entry["rules"][isolated[t.name]][2] += 1
        if ch["op"] == "delete":
            continue
        data = ch.get("data") or {}
        first = failing_rule(t, data) if t.name not in isolated else None
        for r in t.cfg.quality.raw_to_staging:
            if r.severity != "quarantine" and rule_fails(r, data):
                entry["rules"][r.rule_name][1] += 1
        if first is not None:
            entry["rules"][first][1] += 1
            entry["rules"][first][2] += 1
    return {name: {"checked": e["checked"], "rules": {r: tuple(v) for r, v in e["rules"].items()}}
            for name, e in out.items()}


def op_counts(changes: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """table -> op -> number of source changes (pk changes also counted as `pk_change`)."""
    out: dict[str, dict[str, int]] = {}
    for ch in changes:
        c = out.setdefault(ch["table"], {})
        c[ch["op"]] = c.get(ch["op"], 0) + 1
        if ch["op"] == "update" and ch.get("before"):
            c["pk_change"] = c.get("pk_change", 0) + 1
    return out


@dataclass
class Oracle:
    state: dict[str, dict[Key, dict[str, Any]]]
    scd2: dict[str, list[dict[str, Any]]]
    quarantine: dict[tuple[str | None, str], int]
    counts: dict[str, dict[str, int]]
    facts: dict[str, dict[Key, dict[str, Any]]] = field(default_factory=dict)


def build_oracle(project: Project, history: HistoryData, salt: str, target: str = "kinesis",
                 transforms: dict[str, RowTransform] | None = None,
                 stage_transforms: StageTransforms | None = None) -> Oracle:
    state = expected_state(project, history.changes, salt, transforms)
    references = live_references(project, state)
    return Oracle(
        state=state,
        scd2=expected_scd2(project, history.changes, salt, transforms, stage_transforms, references),
        quarantine=expected_quarantine(project, history.changes, history.faults(target)),
        counts=op_counts(history.changes),
        facts=expected_facts(project, history.changes, salt, transforms, stage_transforms, references),
    )
