"""Structured metrics as CloudWatch Embedded Metric Format (EMF) JSON log lines.

On Glue/Lambda the log line itself becomes CloudWatch metrics (alarms in infra/ are built on them);
locally the lines go to stdout or a file. Metric payloads carry counts and names only, never data.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

NAMESPACE = "cdcflow"
_log = logging.getLogger("cdcflow.metrics")


class MetricsSink:
    def __init__(self, pipeline: str, stream: IO[str] | None = None, path: str | None = None):
        self.pipeline = pipeline
        self._stream = stream
        self._path = path

    def emit(self, metrics: dict[str, float], dimensions: dict[str, str], units: dict[str, str] | None = None,
             properties: dict | None = None) -> dict:
        """Write one EMF record: metrics under the given dimensions (plus Pipeline)."""
        dims = {"Pipeline": self.pipeline, **dimensions}
        units = units or {}
        record = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": NAMESPACE,
                        "Dimensions": [list(dims)],
                        "Metrics": [{"Name": k, "Unit": units.get(k, "Count")} for k in metrics],
                    }
                ],
            },
            **dims,
            **metrics,
            **(properties or {}),
        }
        line = json.dumps(record, default=str)
        if self._path:
            with open(self._path, "a") as f:
                f.write(line + "\n")
        else:
            (self._stream or sys.stdout).write(line + "\n")
        return record

    def alert(self, name: str, table: str, reason: str) -> dict:
        """An alert is a metric with value 1 (alarms fire on Sum >= 1)."""
        _log.warning("alert %s on %s: %s", name, table, reason)
        return self.emit({name: 1}, {"Table": table}, properties={"reason": reason})
