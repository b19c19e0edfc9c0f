"""The live session's text cache: bounded in bytes, always keeps the latest text, makes room
before a forward pass rather than after it, and never changes a result."""

from __future__ import annotations

import pytest

from headscope.analysis.attribution import qk_attribution
from headscope.analysis.session import CACHE_BYTES, Session
from headscope.memory import release_freed_memory
from tests.tiny_models import tiny_adapter

TEXTS = [f"text number {i}: the cat sat on the mat, the cat sat on the mat." for i in range(4)]


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("llama")


def test_cache_stays_within_budget_and_keeps_the_latest(adapter):
    one = Session(adapter).state(TEXTS[0]).nbytes
    session = Session(adapter, cache_bytes=2 * one)
    for text in TEXTS:
        session.state(text)
        assert sum(st.nbytes for st in session._cache.values()) <= 2 * one
    assert list(session._cache) == TEXTS[-2:]
    tiny = Session(adapter, cache_bytes=1)
    for text in TEXTS:
        assert tiny.state(text).text == text
        assert list(tiny._cache) == [text]


def test_room_is_made_before_the_forward_pass(adapter, monkeypatch):
    one = Session(adapter).state(TEXTS[0]).nbytes
    session = Session(adapter, cache_bytes=2 * one)
    held: list[int] = []
    run = adapter.run

    def counting_run(*args, **kwargs):
        held.append(len(session._cache))
        return run(*args, **kwargs)

    monkeypatch.setattr(adapter, "run", counting_run)
    for text in TEXTS:
        session.state(text)
    # with room for two texts, at most one other is held while a new one runs
    assert held == [0, 1, 1, 1]


def test_results_do_not_depend_on_the_budget(adapter):
    roomy, tight = Session(adapter), Session(adapter, cache_bytes=1)
    for text in TEXTS + TEXTS[:1]:
        a = qk_attribution(roomy, text, "L1H2", 6, 3)
        b = qk_attribution(tight, text, "L1H2", 6, 3)
        assert a.model_dump() == b.model_dump()


def test_default_budget_and_release(adapter):
    session = Session(adapter)
    assert session.cache_bytes == CACHE_BYTES
    session.state(TEXTS[0])
    release_freed_memory(collect=True)  # a no-op where the C library cannot
    assert TEXTS[0] in session._cache
