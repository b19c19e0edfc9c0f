"""Head loadings of SAE features and their k-means sweep."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from headscope.dictionaries import head_loadings, head_names, kmeans_sweep, plot_cluster_sizes

H, D_HEAD, D_SAE = 4, 8, 64


def planted_decoder(n_layers: int = 1, seed: int = 0) -> torch.Tensor:
    """[D_SAE, n_layers·H·D_HEAD]: feature i writes to slice i % (n_layers·H) (+ small leakage)."""
    gen = torch.Generator().manual_seed(seed)
    n_slices = n_layers * H
    w = 0.01 * torch.randn(D_SAE, n_slices, D_HEAD, generator=gen)
    for i in range(D_SAE):
        w[i, i % n_slices] += torch.randn(D_HEAD, generator=gen)
    return w.reshape(D_SAE, n_slices * D_HEAD)


def test_head_loadings_find_the_planted_head() -> None:
    loadings = head_loadings(planted_decoder(), n_heads=H, d_head=D_HEAD)
    assert loadings.shape == (D_SAE, H) and loadings.dtype == np.float32
    assert np.array_equal(loadings.argmax(1), np.arange(D_SAE) % H)
    np.testing.assert_allclose(loadings.sum(1), 1.0, rtol=1e-6)
    assert (loadings.max(1) > 0.9).all()


def test_two_layer_decoder_gives_one_column_per_layer_head() -> None:
    w = planted_decoder(n_layers=2)
    loadings = head_loadings(w.numpy(), n_heads=H, d_head=D_HEAD)
    assert loadings.shape == (D_SAE, 2 * H)
    assert np.array_equal(loadings.argmax(1), np.arange(D_SAE) % (2 * H))
    assert head_names((4, 10), H)[loadings[5].argmax()] == "L10H1"


def test_head_loadings_zero_row_and_bad_shape() -> None:
    w = planted_decoder()
    w[3] = 0
    loadings = head_loadings(w, n_heads=H, d_head=D_HEAD)
    assert np.isfinite(loadings).all() and (loadings[3] == 0).all()
    with pytest.raises(ValueError, match="multiple of n_heads"):
        head_loadings(w, n_heads=3, d_head=D_HEAD)


def test_kmeans_sweep_is_deterministic_and_finds_planted_clusters() -> None:
    loadings = head_loadings(planted_decoder(), n_heads=H, d_head=D_HEAD)
    sweep = kmeans_sweep(loadings, ks=(2, 4, 8), seed=0)
    assert sweep == kmeans_sweep(loadings, ks=(2, 4, 8), seed=0)
    assert list(sweep) == [2, 4, 8]
    assert sweep[4]["sizes"] == [16, 16, 16, 16]
    for k, entry in sweep.items():
        assert len(entry["sizes"]) == k and sum(entry["sizes"]) == D_SAE
        assert entry["sizes"] == sorted(entry["sizes"], reverse=True)
    assert sweep[2]["inertia"] > sweep[4]["inertia"] >= sweep[8]["inertia"]
    with pytest.raises(ValueError, match="k=65"):
        kmeans_sweep(loadings, ks=(65,))


def test_plot_cluster_sizes_writes_one_series_per_k(tmp_path: Path) -> None:
    sweep = {
        2: {"sizes": [40, 24], "inertia": 1.0},
        8: {"sizes": [20, 10, 10, 8, 8, 4, 3, 1], "inertia": 0.5},
    }
    path = plot_cluster_sizes(sweep, tmp_path / "sizes.svg")
    root = ET.parse(path).getroot()
    ns = {"svg": "http://www.w3.org/2000/svg"}
    lines = root.findall("svg:polyline", ns)
    assert [line.get("data-k") for line in lines] == ["2", "8"]
    assert [len(line.get("points", "").split()) for line in lines] == [2, 8]
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"k = 2", "k = 8"} <= texts
