"""Feature pages, the four-corner circuit diagram and the virtual-weights panel, in a real
headless Chromium against the real live server on the tiny code run, given a residual dictionary
for every layer (labelled from the run's corpus) and a z dictionary for the last layer."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest

from headscope.dictionaries.labels import label_features
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.model import ModelAdapter
from headscope.server.serve import serve
from tests.browser.conftest import residual_sae, write_code_corpus
from tests.browser.test_app import LIVE_TIMEOUT, check_line, open_view

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def dict_live_url(code_run, tmp_path_factory) -> Iterator[str]:
    import torch

    root = tmp_path_factory.mktemp("all-dicts")
    run = shutil.copytree(code_run.run_dir, root / "run")
    shutil.rmtree(run / "dictionaries")
    adapter = ModelAdapter.load(str(code_run.model_dir))
    s = adapter.spec
    for layer in range(s.n_layers):
        save_sae(
            residual_sae(s.d_model, layer, seed=layer), run / "dictionaries" / f"resid_L{layer}"
        )
    g = torch.Generator().manual_seed(7)
    z = SAE(
        SAEConfig(
            d_in=s.n_heads * s.d_head,
            d_sae=32,
            architecture="topk",
            k=6,
            site="z",
            layers=(s.n_layers - 1,),
        ),
        generator=g,
    )
    save_sae(z, run / "dictionaries" / f"z_L{s.n_layers - 1}")
    label_features(
        adapter,
        run / "dictionaries",
        write_code_corpus(root / "code.jsonl"),
        n_tokens=2000,
        log=None,
    )
    handle = serve(run, str(code_run.model_dir))
    try:
        yield handle.url
    finally:
        handle.stop()


def test_a_feature_page_by_id(page, dict_live_url, shot):
    open_view(page, dict_live_url, "#/feature/L1/5", "feature", timeout=LIVE_TIMEOUT * 4)
    view = page.locator(".view-feature")
    assert view.locator("h1").inner_text() == "Feature sae:L1/5"
    assert view.locator(".feature-label").inner_text().strip()
    assert "fires on" in view.inner_text()
    assert view.locator(".feature-hist svg rect.hist-bar").count() == 24
    ctx_rows = view.locator(".feature-contexts tbody tr")
    assert ctx_rows.count() > 0
    assert ctx_rows.first.locator(".ctx-at").count() == 1  # the activating token is marked
    heads = view.locator(".feature-heads a")
    assert heads.count() >= 8  # 4 query readers, 4 key readers, earlier writers
    assert all(
        re.fullmatch(r"#/head/L[01]H\d", heads.nth(i).get_attribute("href"))
        for i in range(heads.count())
    )
    near = view.locator(".feature-near .near")
    assert near.count() == 2
    link = near.first.locator("tbody a").first
    assert re.fullmatch(r"#/feature/L1/\d+", link.get_attribute("href"))
    shot(page, "feature_page")
    link.click()
    page.wait_for_function(
        "() => window.__headscope.ready === 'feature' && document.querySelector('.view-feature h1')"
    )
    page.locator(".view-feature h1").wait_for(timeout=LIVE_TIMEOUT)


def test_a_bad_feature_id_is_one_line(page, dict_live_url):
    open_view(page, dict_live_url, "#/feature/L1/999", "feature", timeout=LIVE_TIMEOUT)
    assert "out of range" in page.locator(".view-feature .note.error").inner_text()
    page.console_errors.clear()  # the server's 422 is logged by the browser


def test_the_circuit_has_features_on_all_four_corners(page, dict_live_url, shot):
    open_view(page, dict_live_url, "#/head/L0H1?ex=0&q=6&k=4&basis=sae", "head:L0H1")
    panel = page.locator(".attribution")
    panel.locator("h3 span", has_text="basis: SAE features").wait_for(timeout=LIVE_TIMEOUT)
    total, score = check_line(panel)
    assert total == score
    pairs = panel.locator(".ov-pair-terms tbody tr")
    pairs.first.wait_for(timeout=LIVE_TIMEOUT)
    assert "largest relative difference" in panel.locator(".ov-pairs").inner_text()
    svg = panel.locator(".circuit svg")
    assert "output read by resid:L1" in svg.text_content()
    corners = [
        svg.locator("a.circuit-feature").nth(i).get_attribute("data-feature")
        for i in range(svg.locator("a.circuit-feature").count())
    ]
    texts = svg.text_content()
    for corner in ("query feature", "key feature", "value feature", "output feature"):
        assert corner in texts, corner
    assert any(c.startswith("sae:L0/") for c in corners)
    assert any(c.startswith("sae:L1/") for c in corners)  # the output corner: next layer
    panel.locator(".circuit").scroll_into_view_if_needed()
    shot(panel.locator(".circuit"), "circuit_four_corners")
    # a feature pair is an edge between adjacent layers: which heads carry it
    panel.locator(".ov-pair-terms tbody tr.clickable").first.click()
    line = panel.locator(".head-loadings .loadings-sum")
    line.wait_for(timeout=LIVE_TIMEOUT)
    num = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
    m = re.search(rf"edge {num} = heads {num} \+ residual {num} \+ MLP {num}", line.inner_text())
    assert m, line.inner_text()
    edge, heads_, resid, mlp = map(float, m.groups())
    assert abs(edge - (heads_ + resid + mlp)) <= 1e-2 * max(
        abs(edge), abs(heads_), abs(mlp)
    )  # 3 digits shown
    assert panel.locator(".head-loadings tbody tr").count() == 4  # every head of the layer
    shot(panel.locator(".ov-pairs"), "ov_pairs_head_loadings")
    # every feature row of the attribution tables links to its page; so do the circuit's boxes
    row_link = panel.locator(".terms a.feature-link").first
    assert re.fullmatch(r"#/feature/L[01]/\d+", row_link.get_attribute("href"))
    out = next(c for c in corners if c.startswith("sae:L1/"))
    svg.locator(f"a.circuit-feature[data-feature='{out}']").first.click()
    page.wait_for_function("() => location.hash.startsWith('#/feature/L1/')")
    page.locator(".view-feature h1").wait_for(timeout=LIVE_TIMEOUT * 2)
    assert page.locator(".view-feature h1").inner_text() == f"Feature {out}"


def test_the_last_layer_reads_its_output_with_the_z_dictionary(page, dict_live_url):
    open_view(page, dict_live_url, "#/head/L2H0?ex=0&q=6&k=4&basis=sae", "head:L2H0")
    panel = page.locator(".attribution")
    panel.locator(".ov-pair-terms tbody tr").first.wait_for(timeout=LIVE_TIMEOUT)
    assert "output read by z:L2" in panel.locator(".circuit svg").text_content()
    assert "zsae:L2/" in panel.locator(".ov-pair-terms").inner_text()


def test_the_virtual_weights_panel_explains_and_links(page, dict_live_url, shot):
    open_view(page, dict_live_url, "#/head/L1H0?ex=0&q=5&k=3&basis=sae", "head:L1H0")
    panel = page.locator(".attribution")
    panel.locator("h3 span", has_text="basis: SAE features").wait_for(timeout=LIVE_TIMEOUT)
    panel.locator(".terms td.comp-feature.clickable").nth(1).click()
    vw = panel.locator("#virtual-weights")
    vw.locator("table").nth(1).locator("tbody tr").first.wait_for(timeout=LIVE_TIMEOUT)
    explain = vw.locator(".vw-explain").inner_text()
    assert "frozen pre-norm" in explain and "Same side" in explain and "Other side" in explain
    links = vw.locator("tbody a")
    assert links.count() == 20
    assert all(
        re.fullmatch(r"#/feature/L1/\d+", links.nth(i).get_attribute("href")) for i in range(3)
    )
    assert vw.locator("tbody .muted").count() > 0  # labels beside the features
    vw.scroll_into_view_if_needed()
    shot(vw, "virtual_weights_linked")
