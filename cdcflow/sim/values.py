"""Time formats and realistic column values for the simulated source database.

Values are kept in their DMS JSON form everywhere (history, Kinesis payloads): integers as JSON
numbers, decimals as strings ("12.50"), dates as "YYYY-MM-DD", timestamps as
"YYYY-MM-DD HH:MM:SS.ffffff" (UTC), booleans as JSON booleans.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SOURCE_START = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)  # first CDC commit is just after this
SOURCE_START_US = int((SOURCE_START - EPOCH).total_seconds()) * 1_000_000

COUNTRIES = ["US", "DE", "FR", "GB", "NL", "ES", "IT", "PL", "SE", "CA", "BR", "JP", "IN", "AU"]
FIRST = ["anna", "ben", "carla", "dave", "eva", "felix", "gina", "hugo", "ines", "jon", "kim", "lena", "max",
         "nora", "omar", "paula", "quinn", "rosa", "sam", "tina", "uwe", "vera", "will", "yara", "zoe"]
LAST = ["smith", "meyer", "garcia", "muller", "rossi", "novak", "jansen", "silva", "kowalski", "tanaka",
        "dubois", "lindqvist", "patel", "obrien", "schulz", "moreau"]
WORDS = ["alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper", "kite",
         "lumen", "maple", "nova", "orbit", "pine", "quartz", "river", "summit", "tide", "umber", "vale"]
PRODUCT_NOUNS = ["lamp", "kettle", "novel", "drill", "puzzle", "coffee", "router", "rake", "robot", "tea"]
SEGMENTS = ["consumer", "business", "vip"]
STATUSES = ["placed", "paid", "shipped", "delivered", "cancelled"]
CATEGORIES = ["books", "electronics", "garden", "toys", "grocery"]

_DECIMAL = re.compile(r"^decimal\((\d+),\s*(\d+)\)$")


def us_to_dt(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def iso_us(us: int) -> str:
    """ISO-8601 UTC with microseconds and Z: the metadata / history time format."""
    return us_to_dt(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dms_ts(us: int) -> str:
    """DMS DATETIME text (UTC): `yyyy-MM-dd HH:mm:ss.SSSSSS`, used for timestamp column values."""
    return us_to_dt(us).strftime("%Y-%m-%d %H:%M:%S.%f")


def dms_date(us: int) -> str:
    return us_to_dt(us).strftime("%Y-%m-%d")


def decimal_spec(col_type: str) -> tuple[int, int] | None:
    m = _DECIMAL.match(col_type)
    return (int(m.group(1)), int(m.group(2))) if m else None


def format_decimal(units: int, scale: int) -> str:
    """An integer count of 10^-scale units as a fixed-point string, e.g. (1250, 2) -> '12.50'."""
    sign = "-" if units < 0 else ""
    units = abs(units)
    if scale == 0:
        return f"{sign}{units}"
    whole, frac = divmod(units, 10**scale)
    return f"{sign}{whole}.{frac:0{scale}d}"


def value_for(
    rng: random.Random,
    name: str,
    col_type: str,
    now_us: int,
    serial: int,
    allowed: list | None = None,
    bounds: tuple[float | None, float | None] = (None, None),
) -> object:
    """A realistic value for a column, by column name first, then type; `allowed` and `bounds` come from
    the table's accepted_values and range rules so that clean data passes the configured checks."""
    n = name.lower()
    if allowed:
        return rng.choice(allowed)
    if col_type == "string":
        if "email" in n:
            return f"{rng.choice(FIRST)}.{rng.choice(LAST)}{serial}@example.com"
        if "phone" in n:
            return f"+1-555-{rng.randint(0, 9999):04d}"
        if n in ("full_name", "customer_name"):
            return f"{rng.choice(FIRST).title()} {rng.choice(LAST).title()}"
        if "country" in n:
            return rng.choice(COUNTRIES)
        if "segment" in n:
            return rng.choice(SEGMENTS)
        if "status" in n:
            return rng.choice(STATUSES)
        if "category" in n:
            return rng.choice(CATEGORIES)
        if n == "sku":
            return f"SKU-{serial % 100000:05d}"
        if n == "name":
            return f"{rng.choice(WORDS).title()} {rng.choice(PRODUCT_NOUNS)}"
        return f"{rng.choice(WORDS)}-{rng.randint(0, 999)}"
    lo, hi = bounds
    if col_type in ("int", "bigint", "smallint"):
        top = {"smallint": 30000, "int": 1000, "bigint": 1_000_000}[col_type]
        low = int(lo) if lo is not None else 1
        high = int(hi) if hi is not None else top
        if "quantity" in n or "qty" in n:
            high = min(high, low + 9)
        return rng.randint(low, max(low, min(high, low + top)))
    spec = decimal_spec(col_type)
    if spec:
        precision, scale = spec
        max_units = 10 ** precision - 1
        low = int((lo if lo is not None else 0) * 10**scale)
        high = int(hi * 10**scale) if hi is not None else min(max_units, 1000 * 10**scale)
        high = min(high, low + 1000 * 10**scale)
        return format_decimal(rng.randint(max(low, 50 if low == 0 else low), max(high, low + 1)), scale)
    if col_type in ("double", "float"):
        low = lo if lo is not None else 0.0
        high = hi if hi is not None else low + 1000.0
        return round(rng.uniform(low, high), 3)
    if col_type == "boolean":
        return rng.random() < 0.8 if n in ("active", "enabled") else rng.random() < 0.5
    if col_type == "date":
        return dms_date(now_us - rng.randint(0, 30) * 86_400_000_000)
    if col_type == "timestamp":
        if "created" in n:
            return dms_ts(now_us - rng.randint(1, 3 * 365 * 86_400) * 1_000_000)
        return dms_ts(now_us)
    raise ValueError(f"no value generator for type {col_type!r}")


def violating_value(rule: object, col_type: str) -> object:
    """A value that breaks a raw_to_staging rule (for --dq-failure-rate)."""
    kind = getattr(rule, "rule", "")
    if kind == "not_null":
        return None
    if kind == "range":
        lo, hi = getattr(rule, "min", None), getattr(rule, "max", None)
        bad = (lo - 5) if lo is not None else (hi + 5)  # type: ignore[operator]
        spec = decimal_spec(col_type)
        if spec:
            return format_decimal(int(bad * 10 ** spec[1]), spec[1])
        return int(bad) if col_type in ("int", "bigint", "smallint") else float(bad)
    if kind == "accepted_values":
        return "bogus"
    if kind == "regex":
        return "!!invalid!!"
    if kind == "valid_date":
        day = "1999-01-01" if getattr(rule, "min", None) else "2999-01-01"
        return day if col_type == "date" else f"{day} 00:00:00.000000"
    raise ValueError(f"cannot violate rule {kind!r}")


def dirty_text(rng: random.Random, value: str) -> str:
    """The value as an untidy source holds it: stray spaces around and between words, and the case of
    its letters changed (lower, upper or swapped); always differs from `value`."""
    words = value.split()
    case = rng.choice([str.lower, str.upper, str.swapcase])
    inner = " " * rng.randint(1, 3)
    return " " * rng.randint(0, 2) + inner.join(case(w) for w in words) + " " * rng.randint(1, 2)
