"""The head page's curves (the long-prefix test's attention and direct logit attribution per prefix
length, stored by `headscope long-prefix RUN --add-column`) span their data: a negative logit
attribution is drawn inside the plot box, below a zero line, with tick labels.

The tiny run gets planted curves of both signs. Set HEADSCOPE_CURVE_RUN to a run that holds real
long-prefix curves (e.g. of the default model) to check and screenshot that one too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from headscope.store.columns import add_head_curves
from headscope.store.static import export_static
from tests.browser.static_server import StaticServer
from tests.browser.test_app import open_view

pytestmark = pytest.mark.browser

MIXED = [0.2, -0.1, -0.4, -0.3, 0.05, -0.6]  # crosses 0
NEGATIVE = [-0.05, -0.3, -0.55, -0.4]  # all below 0
ATTENTION = [0.1, 0.3, 0.5, 0.45]


@pytest.fixture(scope="module")
def curves_url(tiny, tmp_path_factory):
    """A copy of the tiny run with planted long-prefix curves on L1H0, as a static export."""
    root = tmp_path_factory.mktemp("curves")
    run = shutil.copytree(tiny.run_dir, root / "run")
    add_head_curves(
        run,
        {
            "long_prefix_attention": {"L1H0": ATTENTION},
            "long_prefix_dla": {"L1H0": MIXED},
            "long_prefix_corrupted_attention": {"L1H0": NEGATIVE},
        },
    )
    with StaticServer(export_static(run, root / "site")) as server:
        yield server.url + "index.html"


def _chart(page, title: str) -> dict:
    """The plot box, the zero line's y (None when there is none), the points and the y tick
    labels of the curve section titled `title`, in the svg's coordinates."""
    return page.evaluate(
        """title => {
          const sec = [...document.querySelectorAll('.head-overview section.panel')]
            .find((s) => s.querySelector('h3').textContent === title);
          const svg = sec.querySelector('svg');
          const box = svg.querySelector('[data-role=plot-area]');
          const zero = svg.querySelector('[data-role=zero-line]');
          const num = (el, a) => Number(el.getAttribute(a));
          return {
            box: { x0: num(box, 'x'), y0: num(box, 'y'),
                   x1: num(box, 'x') + num(box, 'width'), y1: num(box, 'y') + num(box, 'height') },
            zero: zero ? num(zero, 'y1') : null,
            points: [...svg.querySelectorAll('circle')].map((c) => [num(c, 'cx'), num(c, 'cy')]),
            ticks: [...svg.querySelectorAll('text[text-anchor=end]')].map((t) => t.textContent),
          };
        }""",
        title,
    )


def _inside(chart: dict) -> bool:
    b = chart["box"]
    return all(
        b["x0"] - 0.5 <= x <= b["x1"] + 0.5 and b["y0"] - 0.5 <= y <= b["y1"] + 0.5
        for x, y in chart["points"]
    )


def test_negative_curves_lie_inside_the_box_below_zero(page, curves_url, shot):
    open_view(page, curves_url, "#/head/L1H0", "head:L1H0")
    assert page.locator(".head-overview polyline").count() >= 3  # and the precompute's own

    dla = _chart(page, "long prefix dla")
    assert len(dla["points"]) == len(MIXED) and _inside(dla)
    assert dla["zero"] is not None and dla["box"]["y0"] < dla["zero"] < dla["box"]["y1"]
    for (_, y), v in zip(dla["points"], MIXED, strict=True):
        assert (y > dla["zero"]) == (v < 0), (v, y, dla["zero"])
    # the lowest point is the most negative value, and the ticks label negative values and 0
    lowest = max(range(len(MIXED)), key=lambda i: dla["points"][i][1])
    assert MIXED[lowest] == min(MIXED)
    assert "0" in dla["ticks"] and any(t.startswith("-") for t in dla["ticks"])

    neg = _chart(page, "long prefix corrupted attention")
    assert _inside(neg) and neg["zero"] is not None
    assert all(y > neg["zero"] for _, y in neg["points"])
    # all-negative data ends at 0: the zero line is the top of the box, the data fills it
    assert neg["zero"] == pytest.approx(neg["box"]["y0"], abs=0.5)
    assert max(y for _, y in neg["points"]) > neg["box"]["y1"] - 0.2 * (
        neg["box"]["y1"] - neg["box"]["y0"]
    )

    att = _chart(page, "long prefix attention")
    assert _inside(att) and att["zero"] is None  # all positive: 0 is the bottom axis
    assert all(y < att["box"]["y1"] for _, y in att["points"])
    shot(page.locator(".head-overview"), "head_curves_negative")


@pytest.mark.skipif(
    not os.environ.get("HEADSCOPE_CURVE_RUN"), reason="set HEADSCOPE_CURVE_RUN to a run"
)
def test_real_run_curves(page, tmp_path, shot):
    """A run with real long-prefix curves: every curve of the heads named in
    HEADSCOPE_CURVE_HEADS (default L18H6 L24H4) inside its box, negative points below 0."""
    import json

    run = Path(os.environ["HEADSCOPE_CURVE_RUN"])
    heads = os.environ.get("HEADSCOPE_CURVE_HEADS", "L18H6 L24H4").split()
    with StaticServer(export_static(run, tmp_path / "site")) as server:
        for name in heads:
            stored = json.loads((run / "heads" / f"{name}.json").read_text())["curves"]
            open_view(page, server.url + "index.html", f"#/head/{name}", f"head:{name}", 60_000)
            for cname, ys in stored.items():
                chart = _chart(page, cname.replace("_", " "))
                assert _inside(chart), cname
                if min(ys) < 0:
                    assert chart["zero"] is not None
                    for (_, y), v in zip(chart["points"], ys, strict=True):
                        assert v >= 0 or y > chart["zero"], (cname, v)
            curves = page.locator(".head-overview section.panel").filter(
                has=page.locator("h3", has_text="long prefix")
            )
            for i in range(curves.count()):
                shot(curves.nth(i), f"head_curves_{run.name}_{name}_{i}")
