"""Comparing a run with a published metric summary: rank correlations whose values are known
(identical, reversed, one swap), reference columns, and malformed or mismatched summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headscope.store import open_run
from headscope.store.compare import (
    REFERENCE_METRICS,
    CompareResult,
    SummaryError,
    compare_run,
    format_text,
    load_summary,
    reference_columns,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "head_metrics"
GEMMA = FIXTURES / "google-gemma-3-270m-monology-pile-uncopyrighted.json"
L, H = 3, 4  # the tiny llama


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run()


def grid_of(run: Path, metric: str) -> list[list[float]]:
    m = open_run(run).metrics
    g = np.full((L, H), np.nan)
    g[m["layer"], m["head"]] = m[metric]
    return g.tolist()


def write_summary(path: Path, metrics: dict, **config) -> Path:
    cfg = {"model_name": "tiny", "num_hidden_layers": L, "num_attention_heads": H, **config}
    counts = {"attention_positions": [1.0] * L}  # a non-grid entry, as published summaries have
    path.write_text(json.dumps({"config": cfg, "metrics": {**metrics, "counts": counts}}))
    return path


def mirrored(run: Path, transform=lambda g: g) -> dict:
    """Every reference metric, made from the run's paired metric through ``transform``."""
    return {
        ref: transform(np.array(grid_of(run, ours))).tolist()
        for ref, ours in REFERENCE_METRICS.items()
    }


def test_identical_values_correlate_perfectly(run, tmp_path):
    r = compare_run(run, write_summary(tmp_path / "s.json", mirrored(run)))
    assert [(m.reference_metric, m.metric) for m in r.metrics] == list(REFERENCE_METRICS.items())
    for m in r.metrics:
        assert m.spearman == pytest.approx(1.0), m.metric
        assert m.n_heads == L * H
        assert all(d.run_rank == d.reference_rank for d in m.disagreements)
    assert r.unmatched == [] and (r.n_layers, r.n_heads) == (L, H)
    assert CompareResult.model_validate_json(r.model_dump_json()) == r


def test_reversed_values_correlate_minus_one(run, tmp_path):
    r = compare_run(run, write_summary(tmp_path / "s.json", mirrored(run, lambda g: -g)), top=2)
    for m in r.metrics:
        assert m.spearman == pytest.approx(-1.0), m.metric
        # the first and last heads of a ranking move furthest: 12 - 1 places
        assert [abs(d.run_rank - d.reference_rank) for d in m.disagreements] == [11, 11]


def test_one_swap_gives_the_textbook_value_and_names_the_two_heads(run, tmp_path):
    ours = np.array(grid_of(run, "prev_token_score"))
    assert len(np.unique(ours)) == L * H  # no ties, so the closed form below holds
    order = np.argsort(-ours, axis=None)
    top, second = np.unravel_index(order[0], ours.shape), np.unravel_index(order[1], ours.shape)
    ref = ours.copy()
    ref[top], ref[second] = ours[second], ours[top]
    r = compare_run(
        run,
        write_summary(tmp_path / "s.json", {"prev_token_score": ref.tolist()}),
        top=3,
    )
    (m,) = r.metrics
    n = L * H
    assert m.spearman == pytest.approx(1 - 6 * 2 / (n * (n * n - 1)))  # two heads off by 1
    names = {f"L{top[0]}H{top[1]}", f"L{second[0]}H{second[1]}"}
    assert {d.head for d in m.disagreements[:2]} == names
    assert {(d.run_rank, d.reference_rank) for d in m.disagreements[:2]} == {(1, 2), (2, 1)}
    assert m.disagreements[2].run_rank == m.disagreements[2].reference_rank
    assert r.unmatched == []


def test_explicit_pairs_missing_values_and_constant_grids(run, tmp_path):
    ind = grid_of(run, "induction_score")
    ind[0][0] = None  # no value for L0H0: that head is left out
    summary = write_summary(
        tmp_path / "s.json",
        {"induction_score": ind, "qk_distance": [[1.0] * H] * L, "other_score": [[0.0] * H] * L},
    )
    r = compare_run(
        run, summary, metrics={"induction_score": "induction_score", "qk_distance": "qk_distance"}
    )
    by = {m.reference_metric: m for m in r.metrics}
    assert by["induction_score"].metric == "induction_score"
    assert by["induction_score"].spearman == pytest.approx(1.0)
    assert by["induction_score"].n_heads == L * H - 1
    assert all(d.head != "L0H0" for d in by["induction_score"].disagreements)
    assert by["qk_distance"].spearman is None  # constant: a correlation is undefined
    assert r.unmatched == ["other_score"]
    text = format_text(r)
    assert "n/a" in text and "+1.000" in text and "other_score" in text
    assert "induction_score" in text and str(run) in text


def test_reference_columns_line_up_with_the_run_table(run, tmp_path):
    summary = load_summary(write_summary(tmp_path / "s.json", mirrored(run, lambda g: 2 * g)))
    table = open_run(run).metrics
    cols = reference_columns(open_run(run), summary)
    assert list(cols.columns) == [f"ref:{name}" for name in REFERENCE_METRICS]
    assert cols.index.equals(table.index)
    both = pd.concat([table, cols], axis=1)
    np.testing.assert_allclose(both["ref:induction_score"], 2 * both["induction_mass"])
    np.testing.assert_allclose(both["ref:prev_token_score"], 2 * both["prev_token_score"])


def test_the_published_gemma_summary_loads(run):
    s = load_summary(GEMMA)
    assert (s.model, s.n_layers, s.n_heads) == ("google/gemma-3-270m", 18, 4)
    assert set(s.grids) == set(REFERENCE_METRICS)  # "counts" is not a per-head grid
    assert all(g.shape == (18, 4) and np.isfinite(g).all() for g in s.grids.values())
    assert s.dataset == "monology/pile-uncopyrighted"
    with pytest.raises(
        ValueError, match=r"^model shape mismatch: .* 3 layers x 4 heads, .* 18 x 4$"
    ):
        compare_run(run, GEMMA)


def _summary_text(how: str) -> str:
    good = {"prev_token_score": [[0.1] * H] * L}
    config = {"num_hidden_layers": L, "num_attention_heads": H}
    cases = {
        "not json": "{not json",
        "a list": "[]",
        "no config": json.dumps({"metrics": good}),
        "no layer count": json.dumps({"config": {"num_attention_heads": H}, "metrics": good}),
        "zero heads": json.dumps(
            {"config": {"num_hidden_layers": L, "num_attention_heads": 0}, "metrics": good}
        ),
        "ragged grid": json.dumps(
            {"config": config, "metrics": {"prev_token_score": [[0.1] * H] * (L - 1) + [[0.1]]}}
        ),
        "strings": json.dumps(
            {"config": config, "metrics": {"prev_token_score": [["0.1"] * H] * L}}
        ),
        "no grids": json.dumps({"config": config, "metrics": {"counts": {}}}),
        "no shared metric": json.dumps(
            {"config": config, "metrics": {"attention_sink_score": [[0.1] * H] * L}}
        ),
        "other shape": json.dumps(
            {"config": {**config, "num_hidden_layers": L + 1}, "metrics": {"x": [[0.1] * H] * 4}}
        ),
    }
    return cases[how]


MALFORMED = {
    "not json": r"not a JSON metric summary",
    "a list": r"not a head-metrics summary",
    "no config": r"not a head-metrics summary",
    "no layer count": r"config\.num_hidden_layers must be a positive integer, got None",
    "zero heads": r"config\.num_attention_heads must be a positive integer, got 0",
    "ragged grid": r"metric 'prev_token_score' is not a 3 x 4 \[layer\]\[head\] grid",
    "strings": r"metric 'prev_token_score' is not a 3 x 4 \[layer\]\[head\] grid",
    "no grids": r"has no per-head metrics",
    "no shared metric": r"no metric in common: .*attention_sink_score",
    "other shape": r"model shape mismatch: .* 3 layers x 4 heads, .* 4 x 4",
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_malformed_or_mismatched_summaries_fail_with_one_line(run, tmp_path, how):
    path = tmp_path / "s.json"
    path.write_text(_summary_text(how))
    with pytest.raises(SummaryError, match=MALFORMED[how]) as e:
        compare_run(run, path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_missing_files_fail_clearly(run, tmp_path):
    with pytest.raises(ValueError, match="no such metric summary"):
        compare_run(run, tmp_path / "absent.json")
    with pytest.raises(ValueError, match="not a headscope run"):
        compare_run(tmp_path, GEMMA)
