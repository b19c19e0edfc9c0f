"""Fuzzing the live API on a tiny model: no request body, valid or not, may produce a 5xx.

Two generators: hand-written hypothesis strategies that mix plausible and hostile values for
every field of every request model (always run), and schemathesis driven by the app's own
``/openapi.json`` (run when schemathesis is installed). Both are bounded to a few hundred
requests so the file stays well under a minute.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headscope.analysis import results as S
from headscope.analysis.session import Session
from headscope.server import create_app
from tests.tiny_models import tiny_adapter

try:
    import schemathesis
except ImportError:  # optional: the hypothesis strategies below cover the same endpoints
    schemathesis = None

FUZZ = settings(
    max_examples=30,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def app():
    # One intra-op thread: the tiny model gains nothing from more, and on a busy machine
    # OpenMP's spinning threads make each call 100x slower. max_tokens=64 keeps every forward
    # pass tiny; longer texts exercise the limit instead.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield create_app(None, Session(tiny_adapter("llama"), max_tokens=64), queue_size=64)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, raise_server_exceptions=False)


HEADS_OK = [f"L{layer}H{h}" for layer in range(3) for h in range(4)]
HEADS_BAD = ["L3H0", "L0H4", "L-1H0", "l0h0", " L0H0", "L0H0 ", "L²H1", "L٣H1", "LH", "", "L00H01"]
HEADS_BAD += ["L0H0\n", "L" + "9" * 30 + "H0", "L" + "9" * 5000 + "H0", "L1.mlp", "embed"]

SAMPLES = ["hello world", "The quick brown fox", "a", "ab ab ab", "é漢🙂 x", "2024 was a year"]
text = st.one_of(
    st.sampled_from(SAMPLES),
    st.sampled_from(SAMPLES),
    st.sampled_from(["", " ", "\n\n", "x" * 70]),
    st.text(max_size=40),
)
position = st.one_of(
    st.integers(-8, 12),
    st.integers(-8, 12),
    st.sampled_from([2**31, -(2**31), 1 << 40, -(1 << 40)]),
)
head = st.one_of(
    st.sampled_from(HEADS_OK),
    st.sampled_from(HEADS_OK),
    st.sampled_from(HEADS_BAD),
    st.text(max_size=8),
)
heads = st.one_of(
    st.lists(st.sampled_from(HEADS_OK), min_size=1, max_size=3), st.lists(head, max_size=4)
)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def body(required: dict, optional: dict | None = None) -> st.SearchStrategy:
    """Mostly plausible bodies; some with one field replaced by junk or dropped; some junk."""
    plausible = st.fixed_dictionaries(required, optional=optional or {})

    def corrupt(d: dict, data) -> dict:
        if not d:
            return d
        key = data.draw(st.sampled_from(sorted(d)))
        d = dict(d)
        if data.draw(st.booleans()):
            d[key] = data.draw(junk)
        else:
            del d[key]
        return d

    corrupted = st.builds(lambda d, data: corrupt(d, data), plausible, st.data())
    return st.one_of(plausible, plausible, plausible, corrupted, junk)


pair = {"text": text, "query": position, "key": position}
slot_text = st.builds(lambda a, b: f"{a}{{}}{b}", st.text(max_size=15), st.text(max_size=15))
marked = st.builds(
    lambda a, b, c: f"{a}[[{b}]]{c}", st.text(max_size=10), text, st.text(max_size=5)
)
spec = st.one_of(position, st.sampled_from(["last", "slot:0", "slot:-1", "slot:7", "slot:-9"]))
value_range = st.fixed_dictionaries(
    {"start": st.integers(-50, 50), "stop": st.integers(-50, 60)},
    optional={"step": st.integers(-5, 5)},
)

BODIES = {
    "/api/tokenize": body({"text": text}),
    "/api/attend": body({"text": text}, {"heads": st.one_of(st.none(), heads)}),
    "/api/attend-summary": body(
        {"text": text, "head": head},
        {"top": st.integers(-1, 70), "threshold": st.floats(allow_nan=True)},
    ),
    "/api/rank-heads": body(pair),
    "/api/attribute/qk": body(
        {**pair, "head": head},
        {"basis": st.sampled_from(["components", "sae"]), "top": st.integers(-1, 300)},
    ),
    "/api/attribute/ov": body(
        {**pair, "head": head}, {"top": st.integers(-1, 40), "n_tokens": st.integers(-1, 120)}
    ),
    "/api/composition": body({**pair, "head": head}, {"top": st.integers(-1, 20)}),
    "/api/sweep": body(
        {
            "template": st.one_of(slot_text, text),
            "values": st.one_of(st.lists(text, min_size=1, max_size=4), value_range),
            "heads": heads,
        },
        {"query": spec, "key": spec},
    ),
    "/api/geometry": body(
        {
            "queries": st.lists(st.one_of(marked, text), max_size=3),
            "keys": st.lists(marked, max_size=3),
        },
        {"heads": st.one_of(st.none(), heads)},
    ),
    "/api/intervene": body(
        {
            "text": text,
            "heads": heads,
            "component": st.one_of(
                st.sampled_from(["embed", "pos_embed", "bias", "L0H1", "L0.mlp", "L1H3", "L2.mlp"]),
                st.sampled_from(["L9H0", "L0H9", "L5.mlp", "x", ""]),
                st.text(max_size=6),
            ),
            "side": st.sampled_from(["query", "key", "value"]),
            "scale": st.one_of(st.floats(-3, 3), st.floats(), st.integers()),
            "query": position,
        },
        {"key": st.one_of(st.none(), position), "freeze_patterns": st.booleans()},
    ),
    "/api/long-prefix": body(
        {},
        {
            "heads": st.one_of(st.none(), heads),
            "prefix_lengths": st.lists(st.integers(-2, 40), max_size=4),
            "n_sequences": st.integers(-1, 300),
            "seq_len": st.integers(-1, 3000),
            "min_attention": st.one_of(st.floats(), st.integers()),
        },
    ),
}


# ----- valid requests: must succeed and match the response models ------------------------------
MAX_TOKENS = 64
plain = st.text(
    st.characters(codec="utf-8", exclude_characters="[]{}"), min_size=1, max_size=30
).filter(lambda t: t.strip() and len(t.encode()) + 1 <= MAX_TOKENS)
word = st.text("abcdefghij XYZ", min_size=1, max_size=6).filter(str.strip)


@st.composite
def edge(draw, with_head: bool = True) -> dict:
    """A text and a (query, key) pair inside it; the tiny tokenizer is one token per byte."""
    t = draw(plain)
    n = len(t.encode()) + 1
    q = draw(st.integers(0, n - 1))
    k = draw(st.integers(0, q))
    if draw(st.booleans()):
        q -= n  # the same position counted from the end
    out = {"text": t, "query": q, "key": k}
    if with_head:
        out["head"] = draw(st.sampled_from(HEADS_OK))
    return out


@st.composite
def intervention(draw) -> dict:
    e = draw(edge())
    layer = int(e.pop("head")[1])
    upstream = ["embed", "bias"] + [
        f"L{lay}{part}" for lay in range(layer) for part in (".mlp", "H0", "H3")
    ]
    return {
        **e,
        "heads": [f"L{layer}H{draw(st.integers(0, 3))}"],
        "component": draw(st.sampled_from(upstream)),
        "side": draw(st.sampled_from(["query", "key"])),
        "scale": draw(st.floats(-3, 3)),
        "freeze_patterns": draw(st.booleans()),
    }


VALID = {
    "/api/tokenize": (st.fixed_dictionaries({"text": plain}), S.TokenizeResult),
    "/api/attend": (
        st.fixed_dictionaries(
            {"text": plain, "heads": st.lists(st.sampled_from(HEADS_OK), max_size=3)}
        ),
        S.AttendResult,
    ),
    "/api/attend-summary": (
        st.fixed_dictionaries({"text": plain, "head": st.sampled_from(HEADS_OK)}),
        S.AttendSummaryResult,
    ),
    "/api/rank-heads": (edge(with_head=False), S.RankHeadsResult),
    "/api/attribute/qk": (edge(), S.QKResult),
    "/api/attribute/ov": (edge(), S.OVResult),
    "/api/composition": (edge(), S.CompositionResult),
    "/api/sweep": (
        st.fixed_dictionaries(
            {
                "template": st.builds(
                    lambda a, b: f"{a} {{}}{b}", word, st.sampled_from(["", " x"])
                ),
                "values": st.one_of(
                    st.lists(word, min_size=1, max_size=4),
                    st.builds(
                        lambda a, n: {"start": a, "stop": a + n},
                        st.integers(-99, 99),
                        st.integers(1, 5),
                    ),
                ),
                "heads": st.lists(st.sampled_from(HEADS_OK), min_size=1, max_size=3),
                "query": st.sampled_from(["last", "slot:-1", -1]),
                "key": st.sampled_from([0, 1, "slot:0"]),
            }
        ),
        S.SweepResult,
    ),
    "/api/geometry": (
        st.fixed_dictionaries(
            {
                "queries": st.lists(
                    st.builds(lambda a, b: f"{a}[[{b}]]", word, word), min_size=1, max_size=4
                ),
                "keys": st.lists(
                    st.builds(lambda a, b: f"[[{a}]]{b}", word, word), min_size=1, max_size=4
                ),
                "heads": st.one_of(
                    st.none(), st.lists(st.sampled_from(HEADS_OK), min_size=1, max_size=3)
                ),
            }
        ),
        S.GeometryResult,
    ),
    "/api/intervene": (intervention(), S.InterveneResult),
}


@pytest.mark.parametrize("path", sorted(VALID))
@FUZZ
@given(data=st.data())
def test_valid_requests_succeed(client, path, data):
    strategy, model = VALID[path]
    payload = data.draw(strategy, label="body")
    r = client.post(path, json=payload)
    assert r.status_code == 200, (payload, r.text[:500])
    out = model.model_validate(r.json())
    if path == "/api/attribute/qk":
        assert abs(out.total - out.score) <= 1e-4 * max(1.0, abs(out.score))


# ----- hostile requests: any status but 5xx, always with a message -----------------------------
def send(client, path: str, payload) -> None:
    # allow_nan: Python's json (and so the server's parser) accepts NaN/Infinity literals.
    raw = json.dumps(payload, allow_nan=True)
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, f"{path} {raw[:300]} -> {r.status_code} {r.text[:500]}"
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail, r.text


@pytest.mark.parametrize("path", sorted(BODIES))
@FUZZ
@given(data=st.data())
def test_no_5xx_from_hostile_bodies(client, path, data):
    send(client, path, data.draw(BODIES[path], label="body"))


@FUZZ
@given(raw=st.binary(max_size=200), path=st.sampled_from(sorted(BODIES)))
def test_no_5xx_from_raw_bytes(client, raw, path):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, raw, r.text)


@pytest.fixture(scope="module")
def openapi_schema(app):
    if schemathesis is None:
        pytest.skip("schemathesis is not installed")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", sorted(BODIES))
def test_no_5xx_from_the_openapi_schema(openapi_schema, path, mode):
    from schemathesis import GenerationMode

    operation = next(r.ok() for r in openapi_schema.get_all_operations() if r.ok().path == path)

    @settings(
        max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def check(case):
        response = case.call()
        assert response.status_code < 500, (path, case.body, response.text[:500])

    check()
