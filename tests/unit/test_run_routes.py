"""The server's run routes (server/run_routes.py) on a tiny run: a description tested on the
stored examples equals the library's, is saved into the run folder and read back, bad rules and
unknown heads are one line each; without a model the recomputed test and priority pairs say so."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from headscope.analysis.describe import describe_examples
from headscope.analysis.rules import RuleSet
from headscope.analysis.session import Session
from headscope.model import ModelAdapter
from headscope.server.app import create_app

RULES = "rules:\n  - name: previous token\n    distance: 1\n  - name: itself\n    distance: 0\n"


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    return shutil.copytree(tiny_run(), tmp_path_factory.mktemp("routes") / "run")


def test_describe_save_and_read_back(run):
    c = TestClient(create_app(run, None), raise_server_exceptions=False)
    payload = json.loads((run / "heads" / "L1H0.json").read_text())
    vocab = json.loads((run / "vocab.json").read_text())
    want = describe_examples(payload, RuleSet.model_validate(RULES), lambda i: vocab[str(i)])

    r = c.post("/api/run/describe", json={"head": "L1H0", "rules": RULES})
    assert r.status_code == 200, r.text
    assert r.json()["all_rules"]["mass"] == pytest.approx(want.all_rules.mass)
    assert [x["rule"] for x in r.json()["rules"]] == ["previous token", "itself"]

    assert c.get("/api/run/descriptions/L1H0").json() == {
        "head": "L1H0",
        "rules": None,
        "result": None,
    }
    r = c.put("/api/run/descriptions/L1H0", json={"rules": RULES})
    assert r.status_code == 200, r.text
    assert (run / "descriptions" / "L1H0.yaml").read_text() == RULES
    back = c.get("/api/run/descriptions/L1H0").json()
    assert back["rules"] == RULES
    assert back["result"]["all_rules"]["mass"] == pytest.approx(want.all_rules.mass)


def test_bad_input_is_one_line(run):
    c = TestClient(create_app(run, None), raise_server_exceptions=False)
    r = c.put("/api/run/descriptions/L1H0", json={"rules": "rules: [\n"})
    assert r.status_code == 422 and "YAML" in r.json()["detail"] and "\n" not in r.json()["detail"]
    r = c.put("/api/run/descriptions/L1H0", json={"rules": "rules:\n  - distance: 1\n"})
    assert r.status_code == 422 and "name" in r.json()["detail"]
    assert c.get("/api/run/descriptions/L9H9").status_code == 404
    assert c.get("/api/run/descriptions/nonsense").status_code == 422
    r = c.post("/api/run/describe", json={"head": "L1H0", "rules": RULES, "on": "examples"})
    assert r.status_code == 503 and "model" in r.json()["detail"]
    assert c.post("/api/run/priority", json={"head": "L1H0"}).status_code == 503
    assert not (run / "descriptions" / "L9H9.yaml").exists()


def test_with_a_model_examples_and_priority(run, tiny_run):
    model = json.loads((run / "manifest.json").read_text())["config"]["model"]
    c = TestClient(create_app(run, Session(ModelAdapter.load(model))))
    r = c.post("/api/run/describe", json={"head": "L1H0", "rules": RULES, "on": "examples"})
    assert r.status_code == 200 and "recomputed" in r.json()["source"]
    p = c.post("/api/run/priority", json={"head": "L1H0"}).json()
    n = len(json.loads((run / "heads" / "L1H0.json").read_text())["examples"])
    assert p["sequences"] == n and all(h["head"] == "L1H0" for h in p["heads"])
