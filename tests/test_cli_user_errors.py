"""Bad input a new user tries first gets one line naming what is wrong, no traceback (no Spark started)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdcflow.cli", *args], capture_output=True, text=True, cwd=REPO)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def test_full_load_from_a_missing_raw_path_fails_naming_it():
    assert "raw path /does/not/exist does not exist" in one_line(run_cli("full-load", "--raw", "/does/not/exist"))


def test_warehouse_merge_of_a_missing_or_broken_staging_file(tmp_path):
    missing = one_line(run_cli("warehouse-merge", "--staging", "missing.parquet", "--table", "shop.customers"))
    assert "--staging missing.parquet: no such file or folder" in missing
    (tmp_path / "bad.parquet").write_text("not parquet")
    broken = one_line(run_cli("warehouse-merge", "--staging", str(tmp_path / "bad.parquet"), "--table",
                              "shop.customers"))
    assert "not readable as Parquet" in broken


def test_quarantine_per_rule_in_command_summaries():
    from cdcflow.cdc.quarantine import by_rule

    assert by_rule({}) == "0"
    assert by_rule({"no_ordering": 2, "missing_primary_key": 5}) == "7 (missing_primary_key 5, no_ordering 2)"
