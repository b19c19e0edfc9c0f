"""The PCA tab's hover shows every point's context, stored examples or not."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.browser


def test_pca_hover_shows_the_context_of_a_point_outside_the_examples(page, app_url, run_dir, shot):
    head = json.loads((run_dir / "heads" / "L1H0.json").read_text())
    vocab = json.loads((run_dir / "vocab.json").read_text())
    stored = {ex["sequence"] for ex in head["examples"]}
    points = head["pca"]["points"]
    page.goto(app_url + "#/head/L1H0/pca")
    page.wait_for_function(
        "n => window.__headscope && window.__headscope.pcaPoints === n", arg=len(points)
    )
    marks = page.evaluate("window.__headscope.pcaPositions()")
    outside = [m for m in marks if points[m["i"]]["sequence"] not in stored]
    assert outside, "every point's sequence is a stored example: the test needs one that is not"

    def isolated(m: dict) -> bool:
        return all(o is m or (o["x"] - m["x"]) ** 2 + (o["y"] - m["y"]) ** 2 > 36 for o in marks)

    mark = next(m for m in sorted(outside, key=lambda m: m["y"]) if isolated(m))
    point = points[mark["i"]]
    page.mouse.move(mark["x"], mark["y"])
    tip = page.locator("#tooltip .pca-context")
    tip.wait_for()
    # the tokens around the key and the query, in order, with the key and the query marked
    want = [vocab[str(t)] for span in point["context"] for t in span["tokens"]]
    got = page.locator("#tooltip .pca-context .ctx-tok").evaluate_all(
        "els => els.map(e => e.getAttribute('title'))"
    )
    assert len(got) == len(want) >= 2
    positions = [span["start"] + i for span in point["context"] for i in range(len(span["tokens"]))]
    assert got == [f"position {p}" for p in positions]
    key_title = page.locator("#tooltip .ctx-key").first.get_attribute("title")
    query_title = page.locator("#tooltip .ctx-query").last.get_attribute("title")
    assert (key_title, query_title) == (f"position {point['k_pos']}", f"position {point['q_pos']}")
    text = page.locator("#tooltip").inner_text()
    assert "not among the head’s stored examples" in text
    assert "sequence not among the stored examples" not in text
    shot(page, "pca_hover_context", full_page=False)
