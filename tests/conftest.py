"""Shared fixtures: one SparkSession and one embedded stack per test session (the machine has 2 cores)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The embedded stack (moto server + Postgres) on free ports, private to this test session."""
    from cdcflow import localstack

    settings = localstack.StackSettings(
        state_dir=tmp_path_factory.mktemp("stack"), moto_port=free_port(), pg_port=free_port()
    )
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
