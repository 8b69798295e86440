"""JSON run reports under `<lake.root>/_reports/<kind>/` (a local folder or s3://), one file per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdcflow.config import Project


def write_report(project: Project, kind: str, name: str, body: Any) -> str:
    """Write `body` as `<lake>/_reports/<kind>/<name>.json`; returns where."""
    path = project.path(f"_reports/{kind}/{name}.json")
    text = json.dumps(body, indent=2, default=str)
    if path.startswith(("s3://", "s3a://")):
        from cdcflow.aws import project_client, split_s3

        bucket, key = split_s3(path)
        project_client(project, "s3").put_object(Bucket=bucket, Key=key, Body=text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return path
