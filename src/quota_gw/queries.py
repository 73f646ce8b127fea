"""The gateway's SQL by name, read from queries.sql (the way procrastinate keeps its queries):
every statement the routes run through the store is written once, in one file, where a reader
sees them side by side with the schema in migrations/. Code names a query (`Q.insert_org`);
tests/test_store.py checks every name the code uses is defined."""

from __future__ import annotations

import re
from importlib import resources


def parse(text: str) -> dict[str, str]:
    """{name: sql} of the `-- name --` blocks; comment lines inside a block are dropped."""
    out: dict[str, str] = {}
    for name, body in re.findall(r"^-- (\w+) --\n(.*?)(?=^-- \w+ --\n|\Z)", text, re.M | re.S):
        sql = "\n".join(line for line in body.splitlines() if not line.startswith("--")).strip()
        if name in out or not sql:
            raise ValueError(f"queries.sql: {name} is defined twice or empty")
        out[name] = sql.rstrip(";")
    return out


class Queries:
    def __init__(self, queries: dict[str, str]) -> None:
        self.__dict__.update(queries)
        self.names = sorted(queries)

    def __getattr__(self, name: str) -> str:  # only called for a name queries.sql lacks
        raise AttributeError(f"no query {name!r} in queries.sql")


Q = Queries(parse(resources.files("quota_gw").joinpath("queries.sql").read_text()))
