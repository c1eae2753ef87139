"""How the CLI shows an answer of the admin API to a person: rich tables (``--json`` prints the
answer itself, for scripts).

An answer that holds one list of records (``{"groups": [...]}``) is a table with a row per
record; any other object is a table of its fields, where a list of records inside it becomes a
table of its own below. Nested values are shown as compact JSON.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

MAX_CELL = 120


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def _records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _rows(title: str, records: list[dict[str, Any]]) -> Table:
    columns = list(dict.fromkeys(k for r in records for k in r))
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    return table


def render(answer: Any, console: Console | None = None) -> None:
    """Print ``answer`` (decoded JSON) as tables."""
    console = console or Console()
    if isinstance(answer, dict):
        lists = {k: v for k, v in answer.items() if isinstance(v, list)}
        fields = {k: v for k, v in answer.items() if not _records(v)}
        if fields and not (len(answer) == 1 and lists):
            table = Table(show_header=False)
            table.add_column(style="bold")
            table.add_column(overflow="fold")
            for k, v in fields.items():
                table.add_row(k, _cell(v))
            console.print(table)
        for k, v in answer.items():
            if _records(v):
                console.print(_rows(k, v))
            elif isinstance(v, list) and not v and len(answer) == 1:
                console.print(f"{k}: none")
    elif _records(answer):
        console.print(_rows("", answer))
    else:
        console.print(_cell(answer))
