"""Short reprs for the results the API returns, since a notebook shows the repr of a cell's last expression.

The dataclasses' own reprs printed every metric, curve point, bootstrap setting and network layer on one line
(5,000 characters for the smallest run, a `Run` of a timm network far more); these name each field and give what a
long one holds, and the field itself shows the rest (``evaluation.metrics``, ``run.model``).
"""

from __future__ import annotations

import dataclasses
import sys

import pandas as pd

LIMIT = 80  # characters of one field's value shown as is


def short(value) -> str:
    """`repr(value)` when short; otherwise what it is and how big (a table's shape, a dict's first keys)."""
    if isinstance(value, pd.DataFrame):
        return f"<DataFrame: {len(value)} rows × {value.shape[1]} columns>"
    torch = sys.modules.get("torch")  # a network can only come from a process that imported torch
    if torch is not None and isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__}: {sum(p.numel() for p in value.parameters()):,} parameters>"
    text = repr(value)
    if len(text) <= LIMIT:
        return text
    if isinstance(value, dict):
        keys = ", ".join(map(str, list(value)[:5])) + (", …" if len(value) > 5 else "")
        return f"<dict: {len(value)} keys: {keys}>"
    if isinstance(value, (list, tuple)):
        return f"<{type(value).__name__}: {len(value)} items>"
    return text[:LIMIT - 1] + "…"


def short_repr(obj, **more) -> str:
    """``Name(field=…, …)`` of a dataclass, each field through `short`, then `more` (properties worth seeing)."""
    parts = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr] + list(more.items())
    return f"{type(obj).__name__}({', '.join(f'{name}={short(value)}' for name, value in parts)})"
