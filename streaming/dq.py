"""The streaming job's data-quality counts: per table and raw->staging rule, records checked, failed
and quarantined, as EMF metrics per micro-batch, in the run's summary, and as a JSON report per
window (`streaming.dq_report_minutes`) under `<lake.root>/_reports/dq/`, written by the same
cdcflow.reports writer as the warehouse merge's.

Where the numbers come from (no extra Spark job for a table without warn / fail rules):
- checked: the table's records in the batch that parsed (deletes included, as in the batch stages);
  for tables with warn / fail rules, the rows of their rule aggregate (TypedChanges.failures);
- warn / fail rules: that aggregate's failures per rule;
- quarantine rules and the parse checks: the quarantine rows, by the rule that names them (a record
  failing several quarantine rules is named by the first, in config order).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cdcflow.config import Project
from cdcflow.metrics import MetricsSink

log = logging.getLogger("cdcflow.stream")

# Checks a record fails before the rules (cdcflow.cdc.changes): such a record is not "checked".
PARSE_RULES = {"parser", "unknown_operation", "missing_primary_key", "type_mismatch", "no_ordering"}


@dataclass
class RuleCounts:
    severity: str
    failed: int = 0
    quarantined: int = 0


@dataclass
class TableCounts:
    checked: int = 0
    rules: dict[str, RuleCounts] = field(default_factory=dict)

    def add(self, other: TableCounts) -> None:
        self.checked += other.checked
        for rule, c in other.rules.items():
            mine = self.rules.setdefault(rule, RuleCounts(c.severity))
            mine.failed += c.failed
            mine.quarantined += c.quarantined


def table_counts(project: Project, o: Any) -> TableCounts:
    """One table's counts in one micro-batch, from its TableOutcome (streaming.processor)."""
    quarantined = Counter(q[1] for q in o.quarantine_rows)
    if o.dq is not None:
        checked = o.dq.rows
    elif o.isolated:
        checked = 0  # isolated before its rules ran (apply failure, unsafe schema change)
    else:
        checked = o.read - sum(n for rule, n in quarantined.items() if rule in PARSE_RULES)
    out = TableCounts(checked)
    for rule in project.table(o.table).cfg.quality.raw_to_staging:
        name, sev = rule.rule_name, rule.severity
        q = quarantined.pop(name, 0)
        failed = q if sev == "quarantine" else (o.dq.failures.get((name, sev), 0) if o.dq is not None else 0)
        out.rules[name] = RuleCounts(sev, failed, q)
    for name, q in quarantined.items():  # parse checks, isolation
        out.rules[name] = RuleCounts("quarantine", q, q)
    return out


class DqWindow:
    """Counts per table and rule over a window of micro-batches (and over the whole run)."""

    def __init__(self, project: Project, metrics: MetricsSink, clock=time.time):
        self.project = project
        self.metrics = metrics
        self.minutes = project.pipeline.streaming.dq_report_minutes
        self.clock = clock
        self.run: dict[str, TableCounts] = {}
        self.reports: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.window: dict[str, TableCounts] = {}
        self.started: float | None = None
        self.batches: list[int] = []

    def add(self, outcomes: list, batch_id: int) -> None:
        if self.started is None:
            self.started = self.clock()
        self.batches.append(batch_id)
        for o in outcomes:
            counts = table_counts(self.project, o)
            for totals in (self.window, self.run):
                totals.setdefault(o.table, TableCounts()).add(counts)
            for rule, c in counts.rules.items():
                if c.severity in ("warn", "fail") and c.failed:
                    metric = "DqWarnings" if c.severity == "warn" else "DqFailures"
                    self.metrics.emit({metric: c.failed, "DqRowsChecked": counts.checked},
                                      {"Table": o.table, "Rule": rule}, properties={"batch_id": batch_id})
                    log.info("batch %d: %s rule %s (%s) failed on %d of %d records", batch_id, o.table, rule,
                             c.severity, c.failed, counts.checked)
        if self.clock() - self.started >= self.minutes * 60:
            self.flush()

    def flush(self) -> str | None:
        """Write the window's report (if it saw any batch) and start a new window; returns where."""
        if self.started is None or not self.batches:
            return None
        from cdcflow.reports import write_report

        start = datetime.fromtimestamp(self.started, UTC)
        body = {
            "kind": "stream",
            "stage": "raw_to_staging",
            "window_start": start.isoformat(),
            "window_end": datetime.fromtimestamp(self.clock(), UTC).isoformat(),
            "batches": {"first": self.batches[0], "last": self.batches[-1], "count": len(self.batches)},
            "tables": as_rows(self.window),
        }
        path = write_report(self.project, "dq", f"stream-{start:%Y%m%dT%H%M%SZ}-{self.batches[0]}", body)
        self.reports.append(path)
        self._reset()
        return path


def as_rows(counts: dict[str, TableCounts]) -> list[dict[str, Any]]:
    return [
        {"table": t, "checked": c.checked,
         "rules": [{"rule": r, "severity": rc.severity, "failed": rc.failed, "quarantined": rc.quarantined}
                   for r, rc in sorted(c.rules.items())]}
        for t, c in sorted(counts.items())
    ]  # fmt: skip
