"""Validated, typed configuration (see configs/ and the README's configuration reference)."""

from cdcflow.config.loader import Project, Table, absolute_uri, join_uri, load_project
from cdcflow.config.models import STAGES, PipelineConfig, TableConfig

__all__ = ["STAGES", "PipelineConfig", "Project", "Table", "TableConfig", "absolute_uri", "join_uri", "load_project"]
