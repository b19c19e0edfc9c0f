"""The live server's two lanes, on a real uvicorn server with a tiny model: while a new text's
forward pass runs (held open by a hook on a layer), requests the text cache can answer get
their answer quickly and never a 503, and it is the new-text work that is shed when the model
queue is full. Fast (a few seconds): part of every test run."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from headscope.analysis.attribution import qk_attribution
from headscope.analysis.session import Session
from headscope.server import serve
from tests.tiny_models import tiny_adapter

SEEN = [f"seen text {i}: the cat sat on the mat and the dog sat on the log" for i in range(4)]


@pytest.fixture
def gated():
    """A session whose forward passes stop at layer 1 while ``gate`` is closed (``inside`` is
    set once a pass is held there)."""
    ad = tiny_adapter("llama")
    session = Session(ad)
    for text in SEEN:
        session.state(text)
    gate, inside = threading.Event(), threading.Event()
    gate.set()

    def hold(_mod, _args):
        if not gate.is_set():
            inside.set()
            gate.wait(30)

    handle = ad.layer(1).register_forward_pre_hook(hold)
    yield session, gate, inside
    gate.set()
    handle.remove()


def test_cache_hits_are_answered_while_a_new_text_runs(gated, one_thread):
    session, gate, inside = gated
    n_layers, n_heads = session.adapter.spec.n_layers, session.adapter.spec.n_heads
    heads = [f"L{la}H{h}" for la in range(n_layers) for h in range(n_heads)]
    with serve(model=session, queue_size=1) as handle:
        url = handle.url.rstrip("/")
        gate.clear()
        new_body = {"text": "a text nobody has seen", "head": "L2H1", "query": -1, "key": 2}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/api/attribute/qk", json=new_body, timeout=60)
            assert inside.wait(10), "the new text's forward pass did not start"
            # The model is held inside that pass: fill its one waiting slot, then more new
            # texts must be refused, and every seen-text request still answered.
            waiting = pool.submit(
                httpx.post,
                f"{url}/api/rank-heads",
                json={"text": "a second new text", "query": -1, "key": 1},
                timeout=60,
            )
            time.sleep(0.2)
            shed = httpx.post(
                f"{url}/api/attribute/qk", json={**new_body, "text": "a third new text"}
            )
            assert shed.status_code == 503 and shed.json()["detail"].startswith("busy, retry")

            def seen_request(i: int) -> tuple[int, str]:
                r = random.Random(i)
                text = r.choice(SEEN)
                path, body = r.choice(
                    [
                        ("attribute/qk", {"head": r.choice(heads), "query": -1, "key": 3}),
                        ("attribute/ov", {"head": r.choice(heads), "query": -1, "key": 3}),
                        ("rank-heads", {"query": -1, "key": r.randrange(0, 5)}),
                        ("composition", {"head": r.choice(heads[n_heads:]), "query": -1, "key": 2}),
                        ("tokenize", {}),
                    ]
                )
                resp = httpx.post(f"{url}/api/{path}", json={"text": text, **body}, timeout=30)
                return resp.status_code, path

            with ThreadPoolExecutor(6) as clients:
                answers = list(clients.map(seen_request, range(48)))
            # Every answer came while the pass was held: none of them waited for the model.
            assert not first.done() and inside.is_set()
            gate.set()
            got = first.result(30)
            assert waiting.result(30).status_code == 200
        statuses = sorted({status for status, _ in answers})
        assert statuses == [200], [a for a in answers if a[0] != 200][:5]
    assert got.status_code == 200
    reference = Session(tiny_adapter("llama"))
    want = qk_attribution(reference, new_body["text"], "L2H1", -1, 2).model_dump()
    body = got.json()
    assert body["score"] == want["score"] and body["terms"] == want["terms"]
