"""A long text in the custom-text view (real live server, a tiny model allowed 1,024 tokens): the
server's blocked attention summary feeds the token view, the text scrolls in its own box, and a
chosen query's strongest keys are listed as buttons that pick the pair however far back."""

from __future__ import annotations

import random
from urllib.parse import urlencode

import pytest

from headscope.server.serve import serve
from tests.browser.test_app import LIVE_TIMEOUT, open_view
from tests.tiny_models import build, tiny_tokenizer

pytestmark = pytest.mark.browser

N_CHARS = 900  # byte-level tokenizer: 900 tokens + BOS, beyond the view's 600-token threshold


@pytest.fixture(scope="module")
def long_url(tmp_path_factory):
    """A live server with no run (`headscope serve --model M --max-tokens 1024`)."""
    path = tmp_path_factory.mktemp("long") / "model"
    model = build("qwen3")
    model.config.max_position_embeddings = 1024
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    handle = serve(None, str(path), max_tokens=1024)
    try:
        yield handle.url
    finally:
        handle.stop()


def _box(page) -> dict:
    return page.evaluate(
        """() => {
          const box = document.querySelector('.tokens-scroll');
          const r = box.getBoundingClientRect();
          const seen = (i) => {
            const s = box.querySelector(`.tok[data-i='${i}']`).getBoundingClientRect();
            return s.top >= r.top - 1 && s.bottom <= r.bottom + 1;
          };
          const keys = [...document.querySelectorAll('.query-keys button')].map((b) => Number(b.dataset.key));
          return { scrollTop: box.scrollTop, overflow: box.scrollHeight > box.clientHeight + 50,
                   keys, seenLast: seen(900), seenFirst: seen(1),
                   selKey: [...box.querySelectorAll('.sel-key')].map((s) => Number(s.dataset.i)) };
        }"""
    )


def test_a_long_text_scrolls_and_lists_the_querys_keys(page, long_url, shot):
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefgh \n") for _ in range(N_CHARS))
    params = {"text": text, "head": "L1H0", "q": N_CHARS}
    open_view(page, long_url, "#/custom?" + urlencode(params), "custom", timeout=LIVE_TIMEOUT)
    page.wait_for_function(
        "n => document.querySelectorAll('.custom-out .tok').length === n", arg=N_CHARS + 1
    )
    page.locator(".query-keys button").first.wait_for(timeout=LIVE_TIMEOUT)
    assert page.locator("#run-name").inner_text() == "no run served: live views only"
    assert "texts up to 1,024 tokens" in page.locator(".view-custom form").inner_text()
    box = _box(page)
    assert box["overflow"], "the text should scroll inside its box"
    assert box["scrollTop"] > 0 and box["seenLast"] and not box["seenFirst"], box
    assert box["keys"] and all(0 <= k <= N_CHARS for k in box["keys"])
    far = min(k for k in box["keys"] if k > 0) if any(k > 0 for k in box["keys"]) else 0
    page.click(f".query-keys button[data-key='{far}']")
    page.wait_for_function("k => location.hash.includes('k=' + k)", arg=far)
    rows = page.locator("#rank-table tbody tr")
    rows.first.wait_for(timeout=LIVE_TIMEOUT)
    assert rows.count() == 3 * 4
    after = _box(page)
    assert after["selKey"] == [far]
    assert page.evaluate(
        """k => { const box = document.querySelector('.tokens-scroll');
                  const r = box.getBoundingClientRect();
                  const s = box.querySelector(`.tok[data-i='${k}']`).getBoundingClientRect();
                  return s.top >= r.top - 1 && s.bottom <= r.bottom + 1; }""",
        far,
    ), "the chosen key is scrolled into the box"
    shot(page, "custom_long_text", full_page=False)
