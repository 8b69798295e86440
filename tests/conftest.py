"""Shared fixtures: one SparkSession and one embedded stack per test session (the machine has 2 cores)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack():
    """The embedded stack (moto server + Postgres) on free ports, private to this test session."""
    from cdcflow import localstack

    # Not under pytest's own temp root: Postgres runs as another user, so the wheel opens that root's
    # permissions, and a second pytest process starting meanwhile makes it private again (pytest
    # resets it to 0700), which killed the other process's Postgres ("pg_control: Permission denied").
    state_dir = Path(tempfile.mkdtemp(prefix="cdcflow-test-stack-"))
    settings = localstack.StackSettings(state_dir=state_dir, moto_port=free_port(), pg_port=free_port())
    localstack.up(settings)
    saved = {k: os.environ.get(k) for k in localstack.stack_env(settings)}
    os.environ.update(localstack.stack_env(settings))
    yield settings
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    localstack.down(settings)
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def spark():
    from cdcflow.runtime import get_spark, stop_spark

    session = get_spark("cdcflow-tests")
    yield session
    stop_spark()


@pytest.fixture()
def pg(stack):
    """A psycopg connection to the embedded Postgres, in a fresh schema dropped afterwards."""
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.pg_url, autocommit=True) as conn:
        conn.execute(f"create schema {schema}")
        conn.execute(f"set search_path to {schema}")
        yield conn
        conn.execute(f"drop schema {schema} cascade")
