"""The demo's background dictionary training as the app shows it: the real live server on the
tiny run, its dictionaries training in a child process, the header's progress badge while it
runs, every layer in the basis once it is done."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

import pytest

from headscope.dictionaries.background import LiveDictionaries
from headscope.dictionaries.layerwise import LayerwiseConfig
from headscope.server.serve import serve

pytestmark = pytest.mark.browser

SETTINGS = dict(
    n_features=64,
    k=4,
    n_tokens=6000,
    epochs=2,
    n_eval=300,
    seq_len=64,
    sae_batch_size=256,
    lr=3e-3,
    label_tokens=1000,
    edges=4,
    shard_tokens=1000,
)


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "api/health") as resp:
        return json.loads(resp.read())


def test_training_badge_then_every_layer(tiny, tmp_path, page, shot) -> None:
    data = json.loads((tiny.run_dir / "manifest.json").read_text())["config"]["data"]
    cfg = LayerwiseConfig(model=str(tiny.model_dir), data=data, **SETTINGS)
    live = LiveDictionaries(tmp_path / "dictionaries", cfg, [1, 0, 2])
    handle = serve(tiny.run_dir, str(tiny.model_dir), dictionaries=live)
    try:
        assert _health(handle.url)["dictionary_layers"] == []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        assert live.start(log=lambda _m: None, poll=0.2, nice=0, env=env)
        page.goto(handle.url + "#/")
        badge = page.locator("#server-status .badge", has_text="dictionaries")
        badge.wait_for(timeout=20_000)
        assert badge.inner_text().startswith("dictionaries ")
        assert badge.inner_text().split()[1].endswith("/3")
        shot(page.locator("header"), "dictionary-training-badge")
        assert live.wait(timeout=240) == 0
        deadline = time.monotonic() + 10
        while _health(handle.url)["dictionary_layers"] != [0, 1, 2]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        page.reload()
        page.locator("#server-status .badge.live").wait_for()
        assert page.locator("#server-status .badge", has_text="dictionaries").count() == 0
        status = _health(handle.url)["dictionary_training"]
        assert status["phase"] == "done" and status["layers_ready"] == [0, 1, 2]
    finally:
        live.stop()
        handle.stop()
