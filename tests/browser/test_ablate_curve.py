"""The ablation view and the intervention curve under a custom-text attribution, against the real
live server on the tiny run (headless Chromium)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

pytestmark = pytest.mark.browser


def _open(page, url: str, hash_: str, ready: str) -> None:
    page.goto(url + hash_)
    page.wait_for_function(
        "r => window.__headscope && window.__headscope.ready === r", arg=ready, timeout=60_000
    )


def test_ablate_view_shows_every_head(page, live_url, tiny, shot):
    _open(page, live_url, "#/ablate?task=repeated", "ablate")
    page.wait_for_selector(".ablate-result", timeout=120_000)
    cells = page.locator(".ablate-grid svg rect[width]").count()
    n = page.request.post(live_url + "api/ablate", data={"task": "repeated"}).json()
    assert cells >= len(n["heads"]) > 0
    rows = page.locator(".ablate-result tbody tr")
    assert rows.count() == min(15, len(n["heads"]))
    best = max(n["heads"], key=lambda a: a["delta"])["head"]
    assert rows.first.locator("a").inner_text() == best
    shot(page, "ablate_view")


def test_curve_under_custom_attribution(page, live_url, shot):
    text = "The cat sat on the mat. The cat sat on the"
    params = {"text": text, "head": "L1H0", "q": 12, "k": 6, "panel": "attr"}
    _open(page, live_url, "#/custom?" + urlencode(params), "custom")
    page.wait_for_selector("section.intervention-curve[data-ready]", timeout=120_000)
    section = page.locator("section.intervention-curve")
    assert section.locator("select option").count() >= 2
    assert section.locator("svg polyline").count() == 3
    page.wait_for_function(
        "document.querySelector('.curve-readout') && "
        "document.querySelector('.curve-readout').textContent.includes('scale')"
    )
    slider = section.locator("input[type=range]")
    slider.fill("1")
    slider.dispatch_event("change")
    page.wait_for_function(
        "document.querySelector('.curve-readout').textContent.startsWith('scale 1.00')"
    )
    readout = section.locator(".curve-readout").inner_text()
    # scale 1 is the clean model: the re-run edge's attention equals the clean attention
    att = readout.split("attention ")[1].split(" (clean ")
    assert att[0] == att[1].split(")")[0], readout
    shot(section, "intervention_curve")
