"""Add per-head columns computed after a precompute (e.g. ablation effects) to a run.

The run's metrics live in three places the readers use: ``metrics.parquet`` (Python),
``metrics.json`` (the app's scatter) and each ``heads/L{l}H{h}.json``'s ``metrics`` (the head
page). A column is written to all three, replacing a column of the same name.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from headscope.errors import DataError
from headscope.files import read_json, write_json, write_with
from headscope.model.spec import head_name
from headscope.store.run import open_run


def add_head_columns(
    run_dir: str | Path,
    values: dict[str, dict[str, float]],
    docs: dict[str, str],
    *,
    levels: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """Write ``values[column][head] = value`` into the run's metrics (heads absent from a column
    get null). ``docs[column]`` is the explanation the app shows. ``levels[column]`` names the
    values of an ordinal column (``{"1": "monosemantic", ...}``): the app shows the names and
    counts heads per level. Returns the column names."""
    run = open_run(run_dir)
    m = run.metrics
    names = [head_name(int(lay), int(h)) for lay, h in zip(m["layer"], m["head"], strict=True)]
    unknown = sorted({h for col in values.values() for h in col} - set(names))
    if unknown:
        raise DataError(f"heads {', '.join(unknown[:5])} are not in the run {run.path}")
    cols = list(values)
    table = m.drop(columns=[c for c in cols if c in m.columns])
    for col in cols:
        table[col] = np.array([values[col].get(n, np.nan) for n in names], dtype=np.float64)
    write_with(run.path / "metrics.parquet", lambda tmp: table.to_parquet(tmp, index=False))

    js = read_json(run.path / "metrics.json")
    keep = [i for i, c in enumerate(js["columns"]) if c not in values]
    rows = []
    for row in js["rows"]:
        name = head_name(int(row[0]), int(row[1]))
        extra = [_finite(values[c].get(name)) for c in cols]
        rows.append([row[i] for i in keep] + extra)
    named = {c: v for c, v in js.get("levels", {}).items() if c not in values}
    named.update({c: v for c, v in (levels or {}).items() if c in values})
    write_json(
        run.path / "metrics.json",
        {
            "columns": [js["columns"][i] for i in keep] + cols,
            "rows": rows,
            "docs": {**js.get("docs", {}), **{c: docs.get(c, "") for c in cols}},
            **({"levels": named} if named else {}),
        },
    )
    for name in names:
        path = run.path / "heads" / f"{name}.json"
        if not path.is_file():
            continue
        payload = read_json(path)
        metrics = payload.setdefault("metrics", {})
        for col in cols:
            v = _finite(values[col].get(name))
            if v is None:
                metrics.pop(col, None)
            else:
                metrics[col] = v
        write_json(path, payload)
    return cols


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def add_head_curves(run_dir: str | Path, curves: dict[str, dict[str, list[float]]]) -> list[str]:
    """Write ``curves[name][head] = [y, ...]`` into each ``heads/L{l}H{h}.json``'s ``curves``
    (the head page draws each against the prefix length 1..n), replacing curves of the same
    name. Returns the curve names."""
    run = open_run(run_dir)
    for path in sorted((run.path / "heads").glob("L*H*.json")):
        payload = read_json(path)
        stored = payload.setdefault("curves", {})
        for name, by_head in curves.items():
            ys = by_head.get(path.stem)
            if ys is None:
                stored.pop(name, None)
            else:
                stored[name] = [_finite(y) for y in ys]
        write_json(path, payload)
    return list(curves)


def add_head_panels(run_dir: str | Path, key: str, panels: dict[str, dict]) -> int:
    """Write ``panels[head]`` as ``key`` into each ``heads/L{l}H{h}.json`` (a panel the head
    page draws), removing ``key`` from heads without one. Returns the heads written."""
    run = open_run(run_dir)
    names = {path.stem: path for path in sorted((run.path / "heads").glob("L*H*.json"))}
    unknown = sorted(set(panels) - set(names))
    if unknown:
        raise DataError(f"heads {', '.join(unknown[:5])} are not in the run {run.path}")
    for name, path in names.items():
        payload = read_json(path)
        if name in panels:
            payload[key] = panels[name]
        elif key in payload:
            del payload[key]
        else:
            continue
        write_json(path, payload)
    return len(panels)
