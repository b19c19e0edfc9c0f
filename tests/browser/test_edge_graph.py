"""The edge graph view (#/edges) in a real headless Chromium against the real live server on the
tiny code run with a residual dictionary for every layer: nodes and edges drawn from the API's
result, the numbers in the table equal the API's, and the feature page links to it."""

from __future__ import annotations

import re

import pytest

from tests.browser.test_app import LIVE_TIMEOUT, open_view
from tests.browser.test_feature_pages import dict_live_url  # noqa: F401  (the fixture)

pytestmark = pytest.mark.browser

TEXT = "def f(total, count):\n    if total > count:\n        return total - count\n"


def test_the_graph_draws_the_apis_edges_with_their_heads(page, dict_live_url, shot):  # noqa: F811
    from urllib.parse import quote

    url = f"#/edges?text={quote(TEXT)}&layer=2&pos=-1&depth=2&top=5"
    open_view(page, dict_live_url, url, "edges", timeout=LIVE_TIMEOUT * 2)
    view = page.locator(".view-edges")
    assert "Edge graph into sae:L2/" in view.locator("h1").inner_text()
    got = page.evaluate("window.__headscope.edgeGraph")
    api = page.request.post(
        dict_live_url + "api/edge-graph",
        data={"text": TEXT, "layer": 2, "position": -1, "depth": 2, "top": 5},
    ).json()
    assert got == api
    assert len(api["edges"]) == 10 and len(api["scored"]) == 2
    svg = view.locator(".edge-graph svg")
    assert svg.locator("g.node").count() == len(api["nodes"])
    assert svg.locator("g.edge").count() == len(api["edges"])
    for e in api["edges"][:3]:
        g = svg.locator(f"g.edge[data-source='{e['source']}'][data-target='{e['target']}']")
        assert float(g.get_attribute("data-edge")) == pytest.approx(e["edge"])
        heads = sum(h["loading"] for h in e["heads"])
        route = max((abs(heads), e["heads"][0]["head"]), (abs(e["residual"]), "residual"),
                    (abs(e["mlp"]), "MLP"))[1]  # fmt: skip
        assert g.locator("text.edge-label").text_content().startswith(route)
        tip = g.locator("title").text_content()
        assert e["heads"][0]["head"] in tip and "= heads" in tip
        parts = sum(h["loading"] for h in e["heads"]) + e["residual"] + e["mlp"]
        assert abs(parts - e["edge"]) <= 1e-4 * abs(e["edge"])
    rows = view.locator(".edge-table tbody tr")
    assert rows.count() == len(api["edges"])
    for i, e in enumerate(api["edges"]):
        shown = float(rows.nth(i).locator(".edge-value").inner_text())
        assert shown == pytest.approx(e["edge"], rel=1e-3, abs=1e-6)  # 4 significant digits
    # nodes link to their feature pages; a target node is layer 2, sources layers 1 and 0
    links = svg.locator("a.graph-feature")
    assert links.count() == len(api["nodes"])
    assert all(
        re.fullmatch(r"#/feature/L[012]/\d+", links.nth(i).get_attribute("href") or "")
        for i in range(links.count())
    )
    assert {n["layer"] for n in api["nodes"]} == {0, 1, 2}
    shot(view, "edge_graph_tiny")
    # another feature firing there: one click re-draws the graph into it
    other = view.locator(".edge-alternatives button:not(.current)").first
    index = other.get_attribute("data-feature")
    other.click()
    page.wait_for_function(
        "i => window.__headscope.ready === 'edges' && window.__headscope.edgeGraph"
        " && window.__headscope.edgeGraph.target.startsWith(`L2/${i}@`)",
        arg=index,
        timeout=LIVE_TIMEOUT,
    )


def test_a_bad_request_is_one_line(page, dict_live_url):  # noqa: F811
    open_view(page, dict_live_url, "#/edges?text=abc&layer=2&pos=40", "edges", timeout=LIVE_TIMEOUT)
    nav = page.locator("nav.mainnav a[data-nav='edges']")  # the view has its own menu entry
    assert nav.get_attribute("aria-current") == "page" and nav.get_attribute("href") == "#/edges"
    assert "out of range" in page.locator(".view-edges .note.error").inner_text()
    page.console_errors.clear()  # the server's 422 is logged by the browser


def test_a_feature_page_context_opens_its_edge_graph(page, dict_live_url):  # noqa: F811
    open_view(page, dict_live_url, "#/feature/L1/5", "feature", timeout=LIVE_TIMEOUT * 4)
    link = page.locator(".feature-contexts a.edge-graph-link").first
    assert "layer=1" in link.get_attribute("href") and "feature=5" in link.get_attribute("href")
    link.click()
    page.wait_for_function(
        "() => window.__headscope.ready === 'edges' && document.querySelector('.view-edges h1')",
        timeout=LIVE_TIMEOUT * 2,
    )
    assert page.locator(".view-edges h1").inner_text().startswith("Edge graph into sae:L1/5 @")


def test_the_head_loadings_panel_links_to_the_targets_edge_graph(page, dict_live_url):  # noqa: F811
    open_view(page, dict_live_url, "#/head/L0H1?ex=0&q=6&k=4&basis=sae", "head:L0H1")
    panel = page.locator(".attribution")
    panel.locator(".ov-pair-terms tbody tr.clickable").first.click(timeout=LIVE_TIMEOUT)
    link = panel.locator(".head-loadings a.edge-graph-link")
    link.wait_for(timeout=LIVE_TIMEOUT)
    target = re.search(r"Edge graph into (sae:L1/\d+) at position (\d+)", link.inner_text())
    assert target, link.inner_text()
    link.click()
    page.wait_for_function(
        "() => window.__headscope.ready === 'edges' && window.__headscope.edgeGraph",
        timeout=LIVE_TIMEOUT * 2,
    )
    graph = page.evaluate("window.__headscope.edgeGraph")
    node = next(n for n in graph["nodes"] if n["id"] == graph["target"])
    assert (node["feature"], str(node["position"])) == target.groups()
