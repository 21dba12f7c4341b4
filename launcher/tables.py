"""Tables that read at any width: cells never break mid-word; what does not fit is left out, and said."""
from __future__ import annotations

from typing import Any


def fit(console: Any, table: Any, droppable: tuple[str, ...]) -> list[str]:
    """Drop `droppable` columns (by header, in that order) until `table` fits the console's width;
    returns the headers dropped. The other columns are no_wrap or wrap at spaces (the caller's)."""
    from rich.measure import Measurement

    for column in table.columns:  # rich would otherwise cut a no_wrap cell with "…" before wrapping others
        if column.no_wrap:
            column.width = max([len(str(column.header))] + [len(str(c)) for c in column._cells])
    dropped = []
    for header in droppable:
        # measured unbounded: rich clamps a measurement to the width it is given
        if Measurement.get(console, console.options.update_width(10**4), table).minimum <= console.width:
            break
        column = next((c for c in table.columns if c.header == header), None)
        if column is not None:
            table.columns.remove(column)
            dropped.append(header)
            for i, c in enumerate(table.columns):  # rich pads the first and last column by their index
                c._index = i
    return dropped


def say_dropped(console: Any, dropped: list[str], more: str = "--json") -> None:
    if dropped:
        console.print(f"  ({', '.join(dropped)}: left out at {console.width} columns; {more} has them)",
                      highlight=False, markup=False, soft_wrap=not console.is_terminal)


def simple(title: str | None = None) -> Any:
    """A table in the launcher's look: a rule under the header, no outer padding, the title at the left."""
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
