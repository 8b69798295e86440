"""Warehouse loading: staging truncate-and-load, SCD2 dimension merge and fact load (Redshift / Postgres)."""

from batch.warehouse.loader import MergeResult, merge_table

__all__ = ["MergeResult", "merge_table"]
