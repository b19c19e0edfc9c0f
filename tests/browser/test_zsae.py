"""The z-dictionary view of heads in the app: the head page's panel and the scatter's zsae columns
with the model-wide tally, on a copy of the tiny run with a labelled z dictionary of layer 1
(headless Chromium, static export)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from headscope.dictionaries.labels import label_features
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.dictionaries.z_heads import add_to_run, z_heads
from headscope.model import ModelAdapter
from headscope.store.static import export_static
from tests.browser.static_server import StaticServer

pytestmark = pytest.mark.browser

LAYER = 1


@pytest.fixture(scope="module")
def zsae_site(tiny, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The tiny run with zsae columns and panels from a random labelled z SAE of layer 1."""
    root = tmp_path_factory.mktemp("zsae")
    run = shutil.copytree(tiny.run_dir, root / "run")
    adapter = ModelAdapter.load(str(tiny.model_dir))
    s = adapter.spec
    cfg = SAEConfig(
        d_in=s.n_heads * s.d_head, d_sae=64, k=8, site="z", layers=(LAYER,),
        extra={"n_heads": s.n_heads},
    )  # fmt: skip
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0))
    folder = save_sae(sae, root / "saes" / f"z_L{LAYER}")
    data = tiny.run_dir.parent / "data.jsonl"
    label_features(adapter, [folder], data, n_tokens=2000, seq_len=64, skip_sequences=0, log=None)
    result = z_heads([folder], adapter, data=data, n_tokens=1000, seq_len=64, skip_sequences=0)
    add_to_run(run, result)
    with StaticServer(export_static(run, root / "site")) as server:
        yield server.url + "index.html", run


def _open(page, url: str, hash_: str, ready: str) -> None:
    page.goto(url + hash_)
    page.wait_for_function(
        "r => window.__headscope && window.__headscope.ready === r", arg=ready, timeout=20_000
    )


def test_head_page_shows_the_z_panel(page, zsae_site, shot):
    url, run = zsae_site
    name = f"L{LAYER}H2"
    z = json.loads((run / "heads" / f"{name}.json").read_text())["zsae"]
    _open(page, url, f"#/head/{name}", f"head:{name}")
    panel = page.locator(".zsae-panel")
    assert panel.is_visible()
    assert panel.locator(".zsae-class").inner_text() == z["semantic_class"]
    assert panel.locator(".zsae-table tbody tr").count() == len(z["top_features"]) == 10
    first = panel.locator(".zsae-table tbody tr").first.inner_text()
    assert f"#{z['top_features'][0]['feature']}" in first
    text = panel.inner_text()
    assert "of its output variance" in text and f"{100 * z['explained']:.1f}"[:3] in text
    assert f"all {sum(z['tally'].values())} heads with a z dictionary" in text
    # the class metric names its level
    row = page.locator("table.metrics tr", has_text="zsae class")
    assert z["semantic_class"] in row.inner_text()
    shot(panel, "zsae_head_panel")
    # a head of a layer without a z dictionary has no panel
    _open(page, url, "#/head/L0H0", "head:L0H0")
    assert page.locator(".zsae-panel").count() == 0


def test_scatter_offers_the_z_columns_and_the_tally(page, zsae_site, shot):
    url, run = zsae_site
    _open(page, url, "#/heads", "heads")
    options = page.locator("#sel-y option").evaluate_all("os => os.map(o => o.value)")
    for col in ("zsae_class", "zsae_explained", "zsae_top10_explained", "zsae_top_feature_share"):
        assert col in options
    page.select_option("#sel-y", "zsae_class")
    page.wait_for_function("location.hash.includes('y=zsae_class')")
    page.select_option("#sel-c", "zsae_explained")
    page.wait_for_function("location.hash.includes('c=zsae_explained')")
    metrics = json.loads((run / "metrics.json").read_text())
    i = metrics["columns"].index("zsae_class")
    values = [r[i] for r in metrics["rows"]]
    tally = page.locator(".level-tally[data-column=zsae_class]").inner_text()
    n = sum(v is not None for v in values)
    assert f"{n} of {len(values)} heads" in tally
    for k, name in metrics["levels"]["zsae_class"].items():
        assert f"{sum(v == int(k) for v in values)} {name}" in tally
    assert "y: zsae class" in page.locator(".metric-docs").inner_text()
    shot(page, "zsae_scatter")
