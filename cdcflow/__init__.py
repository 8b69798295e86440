"""cdcflow: config-driven CDC from AWS DMS into Delta Lake and Redshift."""

__version__ = "0.1.0"
