"""headscope.show: an iframe on a locally served run."""

from __future__ import annotations

import urllib.request

import pytest

import headscope
from headscope.server.notebook import stop_all


@pytest.fixture
def tiny_run(tmp_path):
    from headscope.precompute.config import PrecomputeConfig
    from headscope.precompute.runner import run_precompute
    from tests.tiny_models import save_tiny, write_texts

    model = save_tiny("gpt2", tmp_path / "model")
    data = write_texts(tmp_path / "data.jsonl", n_docs=10)
    cfg = PrecomputeConfig(
        model=str(model),
        data=str(data),
        sequences=4,
        seq_len=32,
        batch_size=2,
        motif_sequences=4,
        pca_pairs=8,
        probe_sequences=2,
        probe_length=8,
    )
    return run_precompute(cfg, tmp_path / "run", progress=False)


def test_show_serves_the_head_page(tiny_run):
    try:
        view = headscope.show(tiny_run, head="L1H2")
        assert view.url.endswith("#/head/L1H2")
        assert "<iframe" in view._repr_html_() and "L1H2" in view._repr_html_()
        base = view.url.split("#")[0]
        with urllib.request.urlopen(base + "run/heads/L1H2.json") as r:
            assert b'"head":"L1H2"' in r.read()
        assert headscope.show(tiny_run, head="L0H0").url.split("#")[0] == base  # one server per run
    finally:
        stop_all()
