"""Read a run directory (docs/run-format.md): the Python side of the data contract."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ValidationError

from headscope.errors import DataError
from headscope.files import read_json
from headscope.model.spec import head_name, parse_head
from headscope.store.run_format import HeadPayload, Manifest


class RunError(DataError):
    """A run directory that is missing, incomplete or malformed."""


def _validated(model: type[BaseModel], path: Path) -> dict:
    """``path``'s JSON, checked against its model of the run format; RunError names the file."""
    try:
        data = read_json(path)
        model.model_validate(data)
    except (OSError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        where = ".".join(str(x) for x in first["loc"]) + ": " + first["msg"] if first else err
        raise RunError(f"{path} is not a valid run file ({where})") from None
    return data


class Run:
    """A precomputed run. ``metrics`` is a DataFrame (layer, head, name, one column per metric)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise RunError(f"{self.path} is not a headscope run (no manifest.json)")
        self.manifest = _validated(Manifest, manifest)
        if self.manifest.get("status") != "complete":
            raise RunError(
                f"{self.path} is an incomplete run (status {self.manifest.get('status')!r}); "
                "re-run the same precompute command to resume it"
            )

    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "metrics.parquet")

    @property
    def metric_docs(self) -> dict[str, str]:
        return read_json(self.path / "metrics.json")["docs"]

    def head(self, name: str) -> dict:
        """One head's payload (``heads/L{l}H{h}.json``)."""
        layer, h = parse_head(name)
        path = self.path / "heads" / f"{head_name(layer, h)}.json"
        if not path.is_file():
            raise RunError(f"no head {name} in run {self.path}")
        return _validated(HeadPayload, path)

    def similar_heads(self, name: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` nearest heads by pattern-motif embedding: ``[(head, distance), ...]``."""
        similar = self.head(name).get("similar", [])
        if k > len(similar):
            raise RunError(f"the run stores {len(similar)} similar heads per head; asked for {k}")
        return [(s["head"], s["distance"]) for s in similar[:k]]

    def top(self, metric: str, n: int = 3) -> pd.DataFrame:
        if metric not in self.metrics.columns:
            raise RunError(
                f"unknown metric {metric!r}; the run has {list(self.metrics.columns[3:])}"
            )
        return self.metrics.nlargest(n, metric)[["name", metric]]


def open_run(path: Path | str) -> Run:
    """Open a complete run directory."""
    return Run(path)
