"""The attention-features area's curves in a real headless Chromium: the (L0, FVE) sweep of the
MTC and its baselines (one line per variant) and the value-SAE head-loading cluster sizes beside
the MTC's (one log-log chart per set, one line per k), read from decompose/index.json."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from headscope.decompose.io import CLUSTERS_FILENAME, SWEEP_FILENAME
from headscope.decompose.pages import write_pages
from headscope.decompose.results import (
    ClusterSizes,
    LoadingClusterComparison,
    LoadingClusters,
    MTCStats,
    MTCSweep,
)
from headscope.files import write_json
from headscope.model import ModelAdapter
from headscope.server.serve import serve
from tests.browser.test_app import open_view

pytestmark = pytest.mark.browser

L1S = [3e-4, 1e-3, 3e-3, 1e-2]


def _row(variant: str, i: int) -> MTCStats:
    return MTCStats(
        variant=variant, n_features=64, l1=L1S[i], l0=40.0 / (i + 1), moved_l0=30.0 / (i + 1),
        mse=1.0 + i, fve=0.6 - 0.1 * i, dead_fraction=0.0, train_tokens=100, eval_tokens=20,
        seconds=1.0,
    )  # fmt: skip


def _set(name: str, source: str, columns: int) -> LoadingClusters:
    sizes = {2: [40, 24], 8: [20, 12, 9, 8, 6, 4, 3, 2]}
    return LoadingClusters(
        name=name, source=source, layers=[1], columns=[f"c{i}" for i in range(columns)],
        n_features=64, n_live=64, l0=4.0 if source == "value_sae" else None,
        fve=0.8 if source == "value_sae" else None,
        clusters=[ClusterSizes(k=k, sizes=v, inertia=1.0) for k, v in sizes.items()],
        loglog_slope={8: -1.2},
    )  # fmt: skip


@pytest.fixture(scope="module")
def curves_url(tiny, tmp_path_factory) -> Iterator[str]:
    run = shutil.copytree(tiny.run_dir, tmp_path_factory.mktemp("curves") / "run")
    dec = run / "decompose"
    rows = [_row(v, i) for v in ("mtc", "single_head", "sae_mtc") for i in range(4)]
    sweep = MTCSweep(
        layer=1, target="attn_out", setting="l1", values=L1S, options={"epochs": 2},
        train_tokens=100, eval_tokens=20, rows=rows, seconds=12.0,
    )  # fmt: skip
    write_json(dec / "sweep-L1" / SWEEP_FILENAME, sweep.model_dump())
    sets = [
        _set("MTC head loadings", "mtc", 5),
        _set("value SAE on layer 1", "value_sae", 2),
        _set("value SAE on layers 0 and 1", "value_sae", 4),
    ]
    comparison = LoadingClusterComparison(
        layer=1, ks=[2, 8], sets=sets, train_tokens=100, eval_tokens=20, seconds=3.0
    )
    write_json(dec / "value-L1" / CLUSTERS_FILENAME, comparison.model_dump())
    write_pages(ModelAdapter.load(str(tiny.model_dir)), run)
    handle = serve(run, None)
    try:
        yield handle.url
    finally:
        handle.stop()


def test_sweep_and_cluster_curves(page, curves_url):
    open_view(page, curves_url, "#/features", "features")
    curves = page.locator("section.features-curves")
    assert curves.count() == 1
    assert curves.locator("svg polyline").count() == 3  # one line per variant
    assert curves.locator("svg circle").count() == 12  # four points each
    assert "SAE + single-head MTC" in curves.inner_text()
    cards = page.locator("section.features-clusters figure.cluster-card")
    assert cards.count() == 3
    assert cards.nth(0).get_attribute("data-source") == "mtc"
    for i in range(3):
        assert cards.nth(i).locator("svg polyline").count() == 2  # k = 2 and k = 8
    assert "log-log slope k 8: -1.2" in cards.nth(1).inner_text()
