"""The head page's describe and knockout tabs and the attention-features area, in a real
headless Chromium against the real live server on a copy of the tiny run (with a trained MTC,
QK diagonalisation and head split of layer 1 and their feature pages)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from headscope.model import ModelAdapter
from headscope.server.serve import serve
from tests.browser.conftest import BROWSER_RUN, write_corpus
from tests.tiny_models import build_tiny_run, save_tiny

pytestmark = pytest.mark.browser

HEAD = "L1H0"


@dataclass(frozen=True)
class FeaturesRun:
    run_dir: Path
    url: str


@pytest.fixture(scope="module")
def features_run(tmp_path_factory) -> Iterator[FeaturesRun]:
    """A run of the tiny llama (as the browser's tiny run, its own writable folder) with
    decompositions of layer 1 trained on its example sequences and their pages, served live."""
    from headscope.decompose.commands import decompose_mtc, decompose_qk, decompose_split
    from headscope.decompose.pages import write_pages

    root = tmp_path_factory.mktemp("features")
    model_dir = save_tiny("llama", root / "model")
    run = build_tiny_run(
        root,
        model=model_dir,
        data=write_corpus(root / "data.jsonl"),
        top_k=10,
        per_bucket=3,
        sparse_top_k=3,
        sparse_threshold=0.05,
        **BROWSER_RUN,
    )
    ad = ModelAdapter.load(str(model_dir))
    seen = {}
    for path in sorted((run / "heads").glob("*.json")):
        for ex in json.loads(path.read_text())["examples"]:
            seen.setdefault(ex["sequence"], torch.tensor(ex["tokens"]))
    contexts = [seen[k] for k in sorted(seen)]
    common = dict(layer=1, seq_len=len(contexts[0]), n_eval=4, epochs=2)
    dec = run / "decompose"
    decompose_mtc(
        ad, contexts, out=dec / "mtc-L1", variants=("mtc",), n_features=16, k_moved=8, **common
    )
    decompose_qk(ad, contexts, head=0, out=dec / "qk-L1H0", n_features=8, **common)
    decompose_split(ad, contexts, head=0, k=2, out=dec / "split-L1H0", **common)
    write_pages(ad, run)
    handle = serve(run, str(model_dir))
    try:
        yield FeaturesRun(run_dir=run, url=handle.url)
    finally:
        handle.stop()


def _hook(page, name: str):
    return page.evaluate(f"window.__headscope.{name} || null")


def test_describe_tab_tests_rules_as_you_type_and_saves_them(page, features_run, shot):
    from headscope.analysis.describe import describe_examples
    from headscope.analysis.rules import RuleSet

    run = features_run.run_dir
    page.goto(f"{features_run.url}#/head/{HEAD}/describe")
    page.wait_for_selector("table.coverage")
    assert page.input_value("textarea.rules-text").startswith("# What does this head do?")
    assert page.locator("table.coverage tbody tr").count() == 2  # one rule + all rules
    rules = "rules:\n  - name: previous token\n    distance: 1\n  - name: itself\n    distance: 0\n"
    page.fill("textarea.rules-text", rules)
    page.wait_for_function(
        "() => document.querySelectorAll('table.coverage tbody tr').length === 3"
    )
    got = _hook(page, "describe")
    vocab = json.loads((run / "vocab.json").read_text())
    payload = json.loads((run / "heads" / f"{HEAD}.json").read_text())
    want = describe_examples(payload, RuleSet.model_validate(rules), lambda i: vocab[str(i)])
    assert [c["rule"] for c in got["rules"]] == ["previous token", "itself"]
    assert got["all_rules"]["mass"] == pytest.approx(want.all_rules.mass)
    assert got["rules"][0]["events"] == pytest.approx(want.rules[0].events)
    shown = page.locator("table.coverage tr.all td").nth(1).inner_text()
    assert shown.strip() == f"{100 * want.all_rules.mass:.1f}%"
    n_cx = len(want.counterexamples)
    assert page.locator("ol.counterexamples > li").count() == n_cx
    if n_cx:
        assert page.locator("ol.counterexamples mark.ctx-key").count() >= 1
    shot(page, "describe_tab")

    page.click("text=Save with the run")
    page.wait_for_selector(".saved-state.ok")
    assert (run / "descriptions" / f"{HEAD}.yaml").read_text() == rules
    saved = json.loads((run / "descriptions" / f"{HEAD}.json").read_text())
    assert saved["all_rules"]["mass"] == pytest.approx(want.all_rules.mass)
    page.reload()
    page.wait_for_selector("table.coverage")
    assert page.input_value("textarea.rules-text") == rules
    assert "saved as descriptions/L1H0.yaml" in page.inner_text(".saved-state")

    page.fill("textarea.rules-text", "rules:\n  - name: broken\n    distance: [1\n")
    page.wait_for_selector(".describe-result .note.error")
    assert "YAML" in page.inner_text(".describe-result .note.error")
    # the browser itself logs the refused request; the app adds no error of its own
    refused = [e for e in page.console_errors if "status of 422" in e and "/api/run/describe" in e]
    assert len(refused) == 1, page.console_errors
    page.console_errors.remove(refused[0])


def test_knockout_tab_moves_attention_and_lists_priority_pairs(page, features_run, shot):
    page.goto(f"{features_run.url}#/head/{HEAD}/knockout?ex=0")
    page.wait_for_selector(".ko-chart svg")
    r = _hook(page, "knockout")
    knocked = r["knocked"]
    assert len(knocked) == 1 and r["knocked_mass"] > 0
    # cheap: the head's own scores renormalised without the knocked keys
    keep = [k for k, sc in enumerate(r["scores"]) if sc is not None and k not in knocked]
    z = sum(math.exp(r["scores"][k]) for k in keep)
    for k in keep:
        assert r["cheap"][k] == pytest.approx(math.exp(r["scores"][k]) / z, abs=1e-5)
    assert r["cheap"][knocked[0]] == 0 and r["exact"] is not None
    assert sum(r["exact"]) == pytest.approx(1, abs=1e-4)
    assert page.locator(".ko-tokens .tok.knocked").count() == 1
    shot(page, "knockout_tab")

    # click another key's bar: it joins the knocked-out set
    assert 0 < knocked[0] < r["query"]  # the default: the strongest earlier, non-sink key
    other = max((k for k in keep if k != r["query"]), key=lambda k: r["before"][k])
    page.locator(f".ko-hit[data-key='{other}']").click()
    page.wait_for_function("() => (window.__headscope.knockout || {}).knocked?.length === 2")
    assert sorted(_hook(page, "knockout")["knocked"]) == sorted([knocked[0], other])

    # a rule instead of keys
    page.fill("input.rule-in", "key: {position: {min: 1, max: 3}}")
    page.press("input.rule-in", "Enter")
    page.wait_for_function(
        "() => (window.__headscope.knockout || {}).knocked.every((k) => k >= 1 && k <= 3)"
    )
    r2 = _hook(page, "knockout")
    assert r2["knocked"] == list(range(1, min(3, r2["query"]) + 1))
    assert "rule=" in page.evaluate("location.hash")

    page.wait_for_selector(
        ".ko-priority table.priority, .ko-priority p.muted + p.muted, .ko-priority .note"
    )
    p = _hook(page, "priority")
    assert p is not None and p["sequences"] == len(
        json.loads((features_run.run_dir / "heads" / f"{HEAD}.json").read_text())["examples"]
    )
    assert page.locator(".ko-priority table.priority tbody tr").count() == len(p["pairs"])


def test_features_area_lists_decompositions_and_their_pages(page, features_run, shot):
    run = features_run.run_dir
    index = json.loads((run / "decompose" / "index.json").read_text())
    assert {e["kind"] for e in index["entries"]} == {"mtc", "qk", "split"}

    # the head page links to the features that load on it
    page.goto(f"{features_run.url}#/head/{HEAD}")
    page.wait_for_selector(".features-link a")
    page.click(".features-link a")
    page.wait_for_selector("table.features-table")
    shown = {
        page.locator("table.features-table tbody tr").nth(i).get_attribute("data-entry")
        for i in range(page.locator("table.features-table tbody tr").count())
    }
    want = {e["name"] for e in index["entries"] if HEAD in e["loads_on"]}
    assert shown == want and "qk-L1H0" in shown and "split-L1H0" in shown
    shot(page, "features_list")

    page.goto(f"{features_run.url}#/features?d=mtc-L1/mtc")
    page.wait_for_selector(".feature-page")
    pages = json.loads((run / "decompose" / "mtc-L1" / "mtc" / "pages.json").read_text())
    first = pages["features"][0]
    assert page.get_attribute(".feature-page", "data-feature") == str(first["feature"])
    assert page.locator(".mtc-sources .fx").count() == len(first["sources"])
    assert page.locator(".mtc-destinations .fx").count() == len(first["destinations"])
    n_dst = len(first["destinations"])
    assert page.locator(".mtc-destinations .tok.mk-src").count() == n_dst
    assert page.locator(".mtc-destinations .tok.mk-dst").count() == n_dst
    shot(page, "features_mtc")

    page.goto(f"{features_run.url}#/features?d=qk-L1H0")
    page.wait_for_selector(".qk-pairs")
    qk = json.loads((run / "decompose" / "qk-L1H0" / "pages.json").read_text())["report"]
    assert page.locator(".qk-pairs .fx").count() == len(qk["features"][0]["pairs"])
    assert page.locator(".qk-pairs .tok.mk-query").count() >= 1
    shot(page, "features_qk")

    page.goto(f"{features_run.url}#/features?d=split-L1H0")
    page.wait_for_selector(".split-example")
    split = json.loads((run / "decompose" / "split-L1H0" / "pages.json").read_text())
    n_ex = len(json.loads((run / "heads" / f"{HEAD}.json").read_text())["examples"])
    assert page.locator(".split-example").count() == len(split["examples"]) == n_ex
    subs = (
        page.locator(".split-example")
        .first.locator(".tok")
        .evaluate_all("els => els.map(e => Number(e.dataset.sub))")
    )
    assert subs == split["examples"][0]["top"]
    shot(page, "features_split")


def test_features_work_from_a_static_export(page, features_run, tmp_path):
    """The features area reads only files, so a static export shows it; the describe tab says
    it needs a server."""
    from headscope.store.static import export_static
    from tests.browser.static_server import StaticServer

    site = export_static(features_run.run_dir, tmp_path / "site")
    with StaticServer(site) as server:
        page.goto(f"{server.url}index.html#/features?d=split-L1H0")
        page.wait_for_selector(".split-example")
        page.goto(f"{server.url}index.html#/features?d=qk-L1H0")
        page.wait_for_selector(".qk-pairs .fx")
        page.goto(f"{server.url}index.html#/head/{HEAD}/describe")
        page.wait_for_selector(".note.needs-server")
        assert "needs a live server" in page.inner_text(".note.needs-server")
