"""Compare a run's per-head metrics with a published per-model metric summary.

A summary is one JSON file per model, as Neuronpedia publishes them for its HeadVis pages::

    {"config": {"model_name": "google/gemma-3-270m", "num_hidden_layers": 18,
                "num_attention_heads": 4, "dataset_name": ..., "n_sequences": ..., ...},
     "metrics": {"prev_token_score": [[L0H0, L0H1, ...], [L1H0, ...], ...],   # [layer][head]
                 ...,
                 "counts": {...}}}                                          # not a grid: skipped

The two sides measure on different data, so the comparison is by rank across heads (Spearman),
not by value. Metrics are paired by formula, not by name (:data:`REFERENCE_METRICS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from headscope.errors import DataError
from headscope.model.spec import head_name
from headscope.store.run import Run, open_run

# Reference metric -> the run's metric with the same formula (docs/metrics.md, "Comparing with
# published metrics"). The summary's induction_score sums over a query's induction keys and
# averages over queries, so its counterpart is induction_mass, not the pairwise induction_score
# (which ranks heads the same, on another scale).
REFERENCE_METRICS: dict[str, str] = {
    "self_attention_score": "self_attention_score",
    "prev_token_score": "prev_token_score",
    "pattern_entropy": "pattern_entropy",
    "qk_distance": "qk_distance",
    "qk_distance_variance": "qk_distance_variance",
    "induction_score": "induction_mass",
}
REFERENCE_PREFIX = "ref:"


class SummaryError(DataError):
    """A metric summary file that is missing or malformed, or that does not fit the run."""


@dataclass(frozen=True)
class ReferenceSummary:
    """A published per-model summary: the model's shape and one [L, H] grid per metric."""

    path: Path
    model: str
    n_layers: int
    n_heads: int
    grids: dict[str, np.ndarray]  # name -> [L, H] float64, NaN where the summary has none
    dataset: str | None = None


class HeadDisagreement(BaseModel):
    """One head's place in both rankings (rank 1 = highest value; ties share the mean rank)."""

    head: str
    run_rank: float
    reference_rank: float
    run_value: float
    reference_value: float


class MetricComparison(BaseModel):
    """One metric: rank correlation across the heads both sides have a value for."""

    metric: str
    reference_metric: str
    spearman: float | None  # None when either side is constant over the heads
    n_heads: int
    disagreements: list[HeadDisagreement]  # largest |run_rank - reference_rank| first


class CompareResult(BaseModel):
    """A run against a reference summary, metric by metric."""

    run: str
    reference: str
    reference_model: str
    reference_dataset: str | None
    n_layers: int
    n_heads: int
    metrics: list[MetricComparison]
    unmatched: list[str]  # reference metrics with no counterpart in the run


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _grid(name: str, value: object, n_layers: int, n_heads: int, path: Path) -> np.ndarray:
    rows = value if isinstance(value, list) else None
    if (
        rows is None
        or len(rows) != n_layers
        or not all(isinstance(r, list) and len(r) == n_heads for r in rows)
        or not all(v is None or _is_number(v) for r in rows for v in r)
    ):
        raise SummaryError(
            f"{path}: metric {name!r} is not a {n_layers} x {n_heads} [layer][head] grid of numbers"
        )
    return np.array([[math.nan if v is None else v for v in r] for r in rows], dtype=np.float64)


def _positive_int(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SummaryError(f"{path}: config.{key} must be a positive integer, got {value!r}")
    return value


def load_summary(path: str | Path) -> ReferenceSummary:
    """Read and check a metric summary. Raises :class:`SummaryError` (a ``ValueError``) with
    one line saying what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SummaryError(f"{path}: no such metric summary") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SummaryError(f"{path}: not a JSON metric summary ({e})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("config"), dict)
        or not isinstance(data.get("metrics"), dict)
    ):
        raise SummaryError(
            f"{path}: not a head-metrics summary (expected an object with 'config' and 'metrics')"
        )
    config = data["config"]
    n_layers = _positive_int(config, "num_hidden_layers", path)
    n_heads = _positive_int(config, "num_attention_heads", path)
    grids = {
        name: _grid(name, value, n_layers, n_heads, path)
        for name, value in data["metrics"].items()
        if not isinstance(value, dict)  # "counts": per-layer totals, not a per-head metric
    }
    if not grids:
        raise SummaryError(f"{path}: the summary has no per-head metrics")
    model = config.get("model_name")
    dataset = config.get("dataset_name")
    return ReferenceSummary(
        path=path,
        model=model if isinstance(model, str) else path.stem,
        n_layers=n_layers,
        n_heads=n_heads,
        grids=grids,
        dataset=dataset if isinstance(dataset, str) else None,
    )


def _check_shape(run: Run, summary: ReferenceSummary) -> None:
    model = run.manifest.get("model", {})
    shape = (model.get("n_layers"), model.get("n_heads"))
    if shape != (summary.n_layers, summary.n_heads):
        raise SummaryError(
            f"model shape mismatch: run {run.path} ({model.get('name')}) has {shape[0]} layers x "
            f"{shape[1]} heads, summary {summary.path.name} ({summary.model}) has "
            f"{summary.n_layers} x {summary.n_heads}"
        )


def reference_columns(run: Run, summary: ReferenceSummary) -> pd.DataFrame:
    """The summary's grids as columns aligned with ``run.metrics`` (same index, one row per
    head), named ``ref:<summary metric>``; ``pd.concat([run.metrics, cols], axis=1)`` gives a
    table whose reference columns can be plotted against the run's own."""
    _check_shape(run, summary)
    m = run.metrics
    layer, head = m["layer"].to_numpy(dtype=np.int64), m["head"].to_numpy(dtype=np.int64)
    return pd.DataFrame(
        {f"{REFERENCE_PREFIX}{name}": grid[layer, head] for name, grid in summary.grids.items()},
        index=m.index,
    )


def add_reference_columns(run_dir: str | Path, summary_path: str | Path) -> list[str]:
    """Add the summary's metrics to the run's metrics table (``metrics.parquet`` and
    ``metrics.json``) as ``ref:<metric>`` columns, replacing earlier ones, so the app's scatter
    can plot a run's metric against the reference's. Returns the column names."""
    from headscope.files import read_json, write_json, write_with

    run = open_run(run_dir)
    summary = load_summary(summary_path)
    cols = reference_columns(run, summary)
    m = run.metrics
    keep = [c for c in m.columns if not str(c).startswith(REFERENCE_PREFIX)]
    table = pd.concat([m[keep], cols], axis=1)
    write_with(run.path / "metrics.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    js = read_json(run.path / "metrics.json")
    idx = [i for i, c in enumerate(js["columns"]) if not str(c).startswith(REFERENCE_PREFIX)]
    heads = zip(m["layer"].astype(int), m["head"].astype(int), strict=True)
    by_head = dict(zip(heads, cols.to_numpy(dtype=np.float64), strict=True))
    names = [str(c) for c in cols.columns]
    rows = []
    for row in js["rows"]:
        values = by_head[(int(row[0]), int(row[1]))]
        rows.append(
            [row[i] for i in idx] + [float(v) if math.isfinite(v) else None for v in values]
        )
    source = summary.model or Path(summary_path).name
    docs = {k: v for k, v in js["docs"].items() if not k.startswith(REFERENCE_PREFIX)}
    docs.update({n: f"{n[len(REFERENCE_PREFIX) :]} as published for {source}" for n in names})
    write_json(
        run.path / "metrics.json",
        {"columns": [js["columns"][i] for i in idx] + names, "rows": rows, "docs": docs},
    )
    return names


def _ranks(values: np.ndarray) -> np.ndarray:
    """Descending ranks, 1 = highest; ties get their mean rank."""
    return pd.Series(values).rank(method="average", ascending=False).to_numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _compare_metric(
    ours: pd.Series, theirs: pd.Series, heads: pd.Series, metric: str, ref_metric: str, top: int
) -> MetricComparison:
    keep = np.isfinite(ours.to_numpy(dtype=np.float64)) & np.isfinite(
        theirs.to_numpy(dtype=np.float64)
    )
    a = ours.to_numpy(dtype=np.float64)[keep]
    b = theirs.to_numpy(dtype=np.float64)[keep]
    names = heads.to_numpy()[keep]
    ra, rb = _ranks(a), _ranks(b)
    order = np.argsort(-np.abs(ra - rb), kind="stable")[:top]  # stable: ties in head order
    return MetricComparison(
        metric=metric,
        reference_metric=ref_metric,
        spearman=_spearman(ra, rb),
        n_heads=int(keep.sum()),
        disagreements=[
            HeadDisagreement(
                head=str(names[i]),
                run_rank=float(ra[i]),
                reference_rank=float(rb[i]),
                run_value=float(a[i]),
                reference_value=float(b[i]),
            )
            for i in order
        ],
    )


def compare_run(
    run_dir: str | Path,
    summary_path: str | Path,
    *,
    metrics: Mapping[str, str] | None = None,
    top: int = 5,
) -> CompareResult:
    """Rank-correlate a run's per-head metrics with a published summary's, metric by metric.

    ``metrics`` maps summary metric -> run metric (default :data:`REFERENCE_METRICS`); pairs
    whose run metric the run lacks are listed in ``unmatched``. Only heads the run has (all
    layers, or the ``--layers`` it was made with) and that both sides have a finite value for
    count. ``top``: how many most-disagreeing heads to list per metric.

    Raises ``ValueError`` (:class:`SummaryError`, :class:`~headscope.store.run.RunError`) for a
    missing or malformed run or summary, a model of another shape, or no metric in common.
    """
    run = open_run(run_dir)
    summary = load_summary(summary_path)
    refs = reference_columns(run, summary)
    table = run.metrics
    pairs = REFERENCE_METRICS if metrics is None else metrics
    shared = {
        ref: ours for ref, ours in pairs.items() if ref in summary.grids and ours in table.columns
    }
    unmatched = sorted(ref for ref in summary.grids if ref not in shared)
    if not shared:
        raise SummaryError(
            f"no metric in common: summary {summary.path.name} has {sorted(summary.grids)}, "
            f"run {run.path} has {list(table.columns[3:])}, paired as {dict(pairs)}"
        )
    heads = pd.Series(
        [
            head_name(int(layer), int(h))
            for layer, h in zip(table["layer"], table["head"], strict=True)
        ]
    )
    return CompareResult(
        run=str(run.path),
        reference=str(summary.path),
        reference_model=summary.model,
        reference_dataset=summary.dataset,
        n_layers=summary.n_layers,
        n_heads=summary.n_heads,
        metrics=[
            _compare_metric(
                table[ours].reset_index(drop=True),
                refs[f"{REFERENCE_PREFIX}{ref}"].reset_index(drop=True),
                heads,
                ours,
                ref,
                top,
            )
            for ref, ours in shared.items()
        ],
        unmatched=unmatched,
    )


def format_text(result: CompareResult) -> str:
    """The comparison as a table for a terminal."""
    lines = [
        f"run {result.run}",
        f"vs  {result.reference} ({result.reference_model}"
        + (f", {result.reference_dataset}" if result.reference_dataset else "")
        + f"; {result.n_layers} layers x {result.n_heads} heads)",
        "Spearman rank correlation across heads; most different: head (run rank / reference rank)",
        "",
    ]
    width = max(len(f"{m.metric} ~ {m.reference_metric}") for m in result.metrics)
    for m in result.metrics:
        label = m.metric if m.metric == m.reference_metric else f"{m.metric} ~ {m.reference_metric}"
        rho = "   n/a" if m.spearman is None else f"{m.spearman:+.3f}"
        worst = ", ".join(
            f"{d.head} ({d.run_rank:g}/{d.reference_rank:g})" for d in m.disagreements
        )
        lines.append(f"{label:<{width}}  {rho}  {m.n_heads:>5} heads  {worst}")
    if result.unmatched:
        lines += ["", f"not compared (no counterpart in the run): {', '.join(result.unmatched)}"]
    return "\n".join(lines)
