#!/usr/bin/env python3
"""CDK app: `cdk synth` / `cdk deploy` from this folder (settings: cdk.json context or `-c key=value`)."""

from __future__ import annotations

import os

import aws_cdk as cdk
from cdcflow_stack import CdcflowSettings, CdcflowStack

app = cdk.App()
settings = CdcflowSettings.from_context(app.node)
CdcflowStack(
    app,
    app.node.try_get_context("stack_name") or f"{settings.pipeline}-infra",
    settings=settings,
    env=cdk.Environment(account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=os.environ.get("CDK_DEFAULT_REGION")),
    description="cdcflow: DMS -> Kinesis/S3 -> Glue streaming -> Delta Lake -> Redshift",
)
app.synth()
