"""A metric with no eligible (query, key) pair in the data is undefined: null in the run's files,
never NaN (which broke the JSON writer and left a half-written run) and never a made-up 0."""

from __future__ import annotations

import json
import math

import pandas as pd

from headscope.files import read_json
from headscope.store import open_run
from headscope.store.run_format import HeadPayload, MetricsTable
from tests.tiny_models import build_tiny_run


def test_a_one_token_document_gives_a_complete_run_with_undefined_metrics_as_null(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "a"}) + "\n")  # one token: no repeated token anywhere
    run = build_tiny_run(tmp_path, data=data)
    # the whole run: one sequence of two tokens, BOS and "a"
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "complete"
    assert manifest["tokens"] == {"sequences": 1, "tokens": 2}
    open_run(run)  # every file validates
    table = MetricsTable.model_validate(read_json(run / "metrics.json"))
    undefined = {"induction_score", "induction_mass", "duplicate_token_score"}
    for row in table.rows:
        values = dict(zip(table.columns, row, strict=True))
        for name, value in values.items():
            if name in undefined:
                assert value is None, name
            else:
                assert isinstance(value, int | float) and math.isfinite(value), name
    # the one query position attends to BOS and itself only: defined metrics stay exact
    assert all(
        dict(zip(table.columns, row, strict=True))["prev_token_score"]
        == dict(zip(table.columns, row, strict=True))["bos_score"]
        for row in table.rows
    )
    text = (run / "heads" / "L0H0.json").read_text()
    assert "NaN" not in text
    payload = HeadPayload.model_validate_json(text)
    assert {k for k, v in payload.metrics.items() if v is None} == undefined
    df = pd.read_parquet(run / "metrics.parquet")
    assert df[sorted(undefined)].isna().all().all()
    assert not df.drop(columns=[*undefined, "name"]).isna().any().any()
