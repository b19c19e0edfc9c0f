"""headscope.show: an iframe on a locally served run."""

from __future__ import annotations

import urllib.request

import pytest

import headscope
from headscope.server.notebook import stop_all


@pytest.fixture
def run(tiny_run):
    return tiny_run()


def test_show_serves_the_head_page(run):
    try:
        view = headscope.show(run, head="L1H2")
        assert view.url.endswith("#/head/L1H2")
        assert "<iframe" in view._repr_html_() and "L1H2" in view._repr_html_()
        base = view.url.split("#")[0]
        with urllib.request.urlopen(base + "run/heads/L1H2.json") as r:
            assert b'"head":"L1H2"' in r.read()
        assert headscope.show(run, head="L0H0").url.split("#")[0] == base  # one server per run
    finally:
        stop_all()
