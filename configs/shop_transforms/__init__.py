"""DataFrame-API transforms for the sample configs (`transforms.<stage>.functions` of a table file).

Each is `function(df, **params) -> DataFrame`, named `shop_transforms:<function>` in the configs.
The config folder is on sys.path when the configs load, so this package is found beside them; the
Glue deploy ships it in the job bundle too. Column expressions only (no Python UDFs): the function
builds the plan on the driver, Spark runs it, on both Spark runtimes.
"""

from __future__ import annotations


def normalise_text(df, columns: list[str], case: str = "title"):
    """Trim, collapse inner runs of whitespace to one space, and set the case (`title`, `upper`,
    `lower` or `keep`) of each listed string column; nulls stay null."""
    from pyspark.sql import functions as F

    cased = {"title": F.initcap, "upper": F.upper, "lower": F.lower, "keep": lambda c: c}
    if case not in cased:
        raise ValueError(f"case must be one of {sorted(cased)}, not {case!r}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in the input")
    return df.withColumns({c: cased[case](F.trim(F.regexp_replace(F.col(c), r"\s+", " "))) for c in columns})
