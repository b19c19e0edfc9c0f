"""Residual dictionaries for every layer from one stream, their quality table, and the
background training that swaps them into a running server (tiny models, no downloads)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from headscope.analysis.session import Session
from headscope.dictionaries import stream as stream_mod
from headscope.dictionaries.background import LiveDictionaries
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.layerwise import (
    QUALITY_FILENAME,
    STREAM_DIR,
    LayerwiseConfig,
    layers_done,
    train_layers,
)
from headscope.dictionaries.quality import error_share
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.server import create_app
from tests.tiny_models import save_tiny, tiny_adapter, write_texts

SMALL = dict(
    n_features=64,
    k=4,
    n_tokens=3000,
    epochs=2,
    n_eval=500,
    seq_len=64,
    sae_batch_size=256,
    lr=3e-3,
    label_tokens=1000,
    edges=4,
    shard_tokens=1000,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and shares the cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("texts") / "texts.jsonl", n_docs=200)


def _count_passes(monkeypatch) -> list[int]:
    """Patch the stream's capture to count forward passes (and the layers each one fed)."""
    calls: list[int] = []
    real = stream_mod.capture_sites

    def spy(adapter, ids, sites):
        calls.append(len(sites))
        return real(adapter, ids, sites)

    monkeypatch.setattr(stream_mod, "capture_sites", spy)
    return calls


def test_one_pass_feeds_every_layer_and_a_second_call_trains_nothing(
    tmp_path, texts, monkeypatch
) -> None:
    adapter = tiny_adapter("llama")
    n_layers = adapter.spec.n_layers
    cfg = LayerwiseConfig(model=adapter.name, data=str(texts), **SMALL)
    calls = _count_passes(monkeypatch)
    rows = train_layers(adapter, cfg, tmp_path / "d", log=None, progress=False)
    # every forward pass captured all layers; enough passes for held-out + training rows, once
    per_pass = 8 * (SMALL["seq_len"] - 1)
    assert calls and set(calls) == {n_layers}
    assert len(calls) <= -(-(SMALL["n_eval"] + SMALL["n_tokens"]) // per_pass) + 2
    assert [r.layer for r in rows] == list(range(n_layers))
    table = json.loads((tmp_path / "d" / QUALITY_FILENAME).read_text())
    for r in rows:
        assert 0.5 < r.explained_variance <= 1 and r.mean_l0 <= SMALL["k"]
        assert 0 <= r.dead_fraction <= 1 and 0 <= r.error_share <= 1
        assert r.n_edges == SMALL["edges"] and r.train_tokens >= 2 * SMALL["n_tokens"]
        assert table[str(r.layer)]["explained_variance"] == r.explained_variance
        stats = json.loads((tmp_path / "d" / f"resid_L{r.layer}" / "stats.json").read_text())
        assert stats["attribution_check"] < 1e-6  # the feature-basis terms add up to the score
        cards = json.loads((tmp_path / "d" / f"resid_L{r.layer}" / "features.json").read_text())
        assert len(cards) == SMALL["n_features"]
        assert any(c["top_contexts"] for c in cards.values())
    assert not (tmp_path / "d" / STREAM_DIR).exists()  # deleted once every layer is done
    assert sorted(DictionarySet(tmp_path / "d").by_layer) == list(range(n_layers))
    calls.clear()
    again = train_layers(adapter, cfg, tmp_path / "d", log=None, progress=False)
    assert calls == [] and again == rows


def test_an_interrupted_capture_resumes_after_its_last_whole_shard(
    tmp_path, texts, monkeypatch
) -> None:
    adapter = tiny_adapter("llama")
    cfg = LayerwiseConfig(model=adapter.name, data=str(texts), **{**SMALL, "edges": 0})
    calls = _count_passes(monkeypatch)
    seen = [0]

    def interrupt(n: int) -> None:
        seen[0] += n
        if seen[0] > 2.5 * SMALL["shard_tokens"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_mod.capture_stream(
            adapter, cfg.stream(), [0, 1, 2], tmp_path / "s", on_tokens=interrupt
        )
    shards = stream_mod.shard_files(tmp_path / "s")
    assert len(shards) == 2  # the held-out file and two whole shards survived
    first = len(calls)
    stream_mod.capture_stream(adapter, cfg.stream(), [1, 2], tmp_path / "s")
    resumed = len(calls) - first
    fresh_calls = _count_passes(monkeypatch)
    stream_mod.capture_stream(adapter, cfg.stream(), [0, 1, 2], tmp_path / "fresh")
    assert resumed < len(fresh_calls)  # went on from the shards, did not start again
    # the resumed stream holds the same rows as one made in a single go
    for key in ("resid_L0", "resid_L2"):
        a = stream_mod.read_layer(stream_mod.shard_files(tmp_path / "s"), key)
        b = stream_mod.read_layer(stream_mod.shard_files(tmp_path / "fresh"), key)
        assert torch.equal(a, b)


def _exact_dictionary(d: int, layer: int) -> SAE:
    """A dictionary that reconstructs every residual exactly: features ±e_i, k = d."""
    cfg = SAEConfig(d_in=d, d_sae=2 * d, k=d, site="resid", layers=(layer,))
    sae = SAE(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_error_share_is_zero_for_an_exact_dictionary_and_one_for_an_empty_one(tmp_path) -> None:
    adapter = tiny_adapter("llama")
    session = Session(adapter)
    d, layer = adapter.spec.d_model, 1
    exact = _exact_dictionary(d, layer)
    empty = _exact_dictionary(d, layer)
    with torch.no_grad():
        empty.W_dec.zero_()  # reconstructs nothing: the residual is all error
    save_sae(exact, tmp_path / "exact")
    save_sae(empty, tmp_path / "empty")
    texts = [[1, *range(10, 40)]]
    share, worst = error_share(session, DictionarySet(tmp_path / "exact"), layer, texts, 6)
    assert share < 1e-6 and worst < 1e-6
    share, worst = error_share(session, DictionarySet(tmp_path / "empty"), layer, texts, 6)
    assert share == pytest.approx(1.0, abs=1e-6) and worst < 1e-6


def _health(client) -> dict:
    r = client.get("/api/health")
    assert r.status_code == 200, r.text
    return r.json()


def test_background_training_swaps_layers_into_a_running_server_and_is_reused(
    tmp_path, texts
) -> None:
    model_dir = save_tiny("llama", tmp_path / "model")
    adapter = tiny_adapter("llama")  # the same weights as the saved model (seed 0)
    folder = tmp_path / "cache" / "dictionaries"
    cfg = LayerwiseConfig(model=str(model_dir), data=str(texts), **SMALL)
    live = LiveDictionaries(folder, cfg, [2, 0, 1])
    client = TestClient(create_app(None, Session(adapter), dictionaries=live))
    h = _health(client)
    assert h["dictionary_layers"] == [] and h["dictionary_training"] is None
    qk = {"text": "the cat sat on the mat", "head": "L1H0", "query": 5, "key": 2, "basis": "sae"}
    r = client.post("/api/attribute/qk", json=qk)
    assert r.status_code == 422 and "still training" in r.json()["detail"]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    messages: list[str] = []
    assert live.start(log=messages.append, poll=0.2, nice=0, env=env)
    seen: list[list[int]] = []
    deadline = time.monotonic() + 240
    while live.running and time.monotonic() < deadline:
        h = _health(client)
        assert h["dictionary_training"]["layers"] == [2, 0, 1]
        if not seen or h["dictionary_layers"] != seen[-1]:
            seen.append(h["dictionary_layers"])
        time.sleep(0.1)
    assert live.wait(timeout=30) == 0
    h = _health(client)
    assert h["dictionary_layers"] == [0, 1, 2]
    assert h["dictionary_training"]["phase"] == "done" and not h["dictionary_training"]["running"]
    # layers arrived one by one, in the order asked for, and never went away
    assert seen[0] == [] and all(set(a) <= set(b) for a, b in zip(seen, seen[1:], strict=False))
    assert [m.split()[2] for m in messages if "swapped in" in m] == ["2", "0", "1"]
    r = client.post("/api/attribute/qk", json=qk)
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["total"] - body["score"]) <= 1e-4
    assert any(t["query"].startswith("sae:L1/") for t in body["terms"])

    # a second start (a new server process on the same machine) reuses every layer
    again = LiveDictionaries(folder, cfg, [2, 0, 1])
    assert sorted(again.by_layer) == [0, 1, 2] and again.complete
    assert not again.start(log=messages.append)
    assert layers_done(folder, cfg, [0, 1, 2]) == [0, 1, 2]


def test_the_demo_orders_its_layers_by_its_heads_and_reuses_the_cache(tmp_path, tiny_run) -> None:
    from headscope.demo import DEMO_METRICS, demo_dictionaries
    from headscope.store import open_run

    run = tiny_run("llama")
    adapter = tiny_adapter("llama")
    messages: list[str] = []
    small = {**SMALL, "n_tokens": 1500, "n_eval": 200, "shard_tokens": 800, "label_tokens": 300}
    dicts = demo_dictionaries(
        run, adapter, tmp_path / "d", model="tiny", log=messages.append, **small
    )
    m = open_run(run).metrics
    first = list(dict.fromkeys(int(m.nlargest(1, c)["layer"].iloc[0]) for c in DEMO_METRICS[:3]))
    assert dicts.layers[: len(first)] == first and sorted(dicts.layers) == [0, 1, 2]
    assert messages[-1].startswith("[4/4] dictionaries: 0 of 3 layers ready")
    train_layers(adapter, dicts.cfg, dicts.folder, dicts.layers, log=None, progress=False)
    again = demo_dictionaries(
        run, adapter, tmp_path / "d", model="tiny", log=messages.append, **small
    )
    assert messages[-1].startswith("[4/4] dictionaries: 3 of 3 layers ready")
    assert again.complete and sorted(again.by_layer) == [0, 1, 2]
