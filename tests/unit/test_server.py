"""The live server on a tiny model: every endpoint, bad inputs, static-file confinement, access
token, the model queue and the notebook ``serve()`` handle."""

from __future__ import annotations

import http.client
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from headscope.analysis import results as S
from headscope.analysis.attend import attend
from headscope.analysis.session import Session
from headscope.server import create_app, serve
from headscope.server.app import HealthResponse
from headscope.server.guard import TOKEN_COOKIE
from tests.tiny_models import tiny_adapter

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(tiny_adapter("llama"))


@pytest.fixture(scope="module")
def client(session) -> TestClient:
    return TestClient(create_app(None, session), raise_server_exceptions=False)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory beside a secret file, with symlinks that stay inside and that escape."""
    run = tmp_path / "myrun"
    (run / "heads").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "status": "complete"}))
    (run / "heads" / "L0H0.json").write_text('{"head": "L0H0"}')
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    os.symlink(tmp_path / "secret.txt", run / "escape.txt")
    os.symlink(tmp_path, run / "escape_dir")
    os.symlink(run / "manifest.json", run / "alias.json")
    return run


def post(client, path, body):
    return client.post(path, json=body)


def ok(resp, model: type[S.BaseModel]):
    assert resp.status_code == 200, resp.text
    return model.model_validate(resp.json())


# ----- happy paths --------------------------------------------------------------------------------
def test_health(client, session):
    h = ok(client.get("/api/health"), HealthResponse)
    assert (h.model, h.n_layers, h.n_heads, h.run) == ("tiny-llama", 3, 4, None)
    assert h.max_tokens == session.max_tokens


def test_tokenize(client, session):
    r = ok(post(client, "/api/tokenize", {"text": "hi there"}), S.TokenizeResult)
    assert r.tokens[0] == "<bos>" and "".join(r.tokens[1:]) == "hi there"
    assert r.ids == session.adapter.tokens.encode("hi there")


def test_attend_matches_library(client, session):
    r = ok(post(client, "/api/attend", {"text": TEXT, "heads": ["L0H1", "L2H3"]}), S.AttendResult)
    ref = attend(session, TEXT, ["L0H1", "L2H3"])
    assert r.tokens == ref.tokens and r.patterns == ref.patterns
    rows = r.patterns["L2H3"]
    assert [len(row) for row in rows] == list(range(1, len(r.tokens) + 1))
    assert all(abs(sum(row) - 1) < 1e-4 for row in rows)
    everything = ok(post(client, "/api/attend", {"text": "ab", "heads": None}), S.AttendResult)
    assert len(everything.patterns) == 12


def test_rank_heads(client):
    r = ok(
        post(client, "/api/rank-heads", {"text": TEXT, "query": -1, "key": 3}), S.RankHeadsResult
    )
    assert len(r.heads) == 12 and r.query == len(r.tokens) - 1 and r.key == 3
    att = [h.attention for h in r.heads]
    assert att == sorted(att, reverse=True)


@pytest.mark.parametrize(
    ("head", "query", "key"), [("L0H0", 5, 5), ("L1H2", -1, 3), ("L2H3", 20, 0)]
)
def test_qk_attribution_sums_to_score(client, head, query, key):
    body = {"text": TEXT, "head": head, "query": query, "key": key}
    r = ok(post(client, "/api/attribute/qk", body), S.QKResult)
    assert abs(r.total - r.score) <= 1e-4
    assert r.basis == "components" and r.head == head
    assert abs(sum(m.value for m in r.query_marginals) - r.score) <= 1e-4
    # Its attention matches the pattern the model computed.
    ranked = post(client, "/api/rank-heads", {"text": TEXT, "query": query, "key": key}).json()
    assert (
        abs(next(h["attention"] for h in ranked["heads"] if h["head"] == head) - r.attention) < 1e-6
    )


def test_ov_attribution(client):
    body = {"text": TEXT, "head": "L2H1", "query": 20, "key": 7}
    r = ok(post(client, "/api/attribute/ov", body), S.OVResult)
    assert r.max_abs_diff < 1e-5
    # Every component is listed (the tiny model has fewer than 30), so values sum to the norm.
    assert abs(sum(t.value for t in r.terms) - r.total_norm) < 1e-4
    assert len(r.promoted) == 10 and len(r.suppressed) == 10


def test_composition(client):
    body = {"text": TEXT, "head": "L2H1", "query": 20, "key": 7, "top": 3}
    r = ok(post(client, "/api/composition", body), S.CompositionResult)
    assert len(r.k_composition) == 3 and len(r.q_composition) == 3
    assert all(c.head.startswith(("L0", "L1")) for c in r.k_composition + r.q_composition)


def test_second_pair_on_a_seen_text_needs_no_forward_pass(client, session):
    calls = []
    real = session.adapter.run

    def counting(*args, **kwargs):
        calls.append((kwargs.get("stop_after"), kwargs.get("resume") is not None))
        return real(*args, **kwargs)

    session.adapter.run = counting
    try:
        text = "a text seen once, then asked about again"
        for q, k in [(5, 2), (9, 1), (-1, 0)]:
            body = {"text": text, "head": "L1H1", "query": q, "key": k}
            assert post(client, "/api/attribute/qk", body).status_code == 200
        assert (
            post(client, "/api/rank-heads", {"text": text, "query": 3, "key": 1}).status_code == 200
        )
    finally:
        del session.adapter.run
    # the QK pairs ran layers 0..1 once; ranking every head continued that pass to the end
    assert calls == [(1, False), (None, True)]


def test_sweep(client, session):
    pytest.importorskip("headscope.analysis.sweep")
    body = {
        "template": "In the year {} the",
        "values": {"start": 1990, "stop": 1994},
        "heads": ["L1H0", "L2H2"],
        "query": "last",
        "key": "slot:0",
    }
    r = ok(post(client, "/api/sweep", body), S.SweepResult)
    assert r.values == ["1990", "1991", "1992", "1993"]
    assert set(r.attention) == {"L1H0", "L2H2"} and all(len(v) == 4 for v in r.attention.values())
    # Each point is the attention of the substituted text itself.
    for i, value in enumerate(r.values):
        pat = attend(session, f"In the year {value} the", ["L2H2"]).patterns["L2H2"]
        pos = r.positions[i]
        assert abs(pat[pos.query][pos.key] - r.attention["L2H2"][i]) < 1e-5
    listed = post(client, "/api/sweep", {**body, "values": ["cat", "dog"]})
    assert ok(listed, S.SweepResult).values == ["cat", "dog"]


def test_geometry(client):
    pytest.importorskip("headscope.analysis.geometry")
    body = {
        "queries": ["The country [[France]]", "The country [[Spain]]", "The country [[Peru]]"],
        "keys": ["The city [[Paris]] is", "The city [[Lima]] is"],
        "heads": ["L1H0", "L2H3"],
    }
    r = ok(post(client, "/api/geometry", body), S.GeometryResult)
    assert set(r.heads) == {"L1H0", "L2H3"}
    for m in [*r.heads.values(), r.residual]:
        assert len(m.cosine) == 3 and all(len(row) == 2 for row in m.cosine)
        assert all(-1.0001 <= v <= 1.0001 for row in m.cosine for v in row)
    assert r.query_labels == ["France", "Spain", "Peru"]


def test_intervene_identity_and_effect(client):
    pytest.importorskip("headscope.analysis.intervene")
    body = {
        "text": TEXT,
        "heads": ["L2H1"],
        "component": "L0H3",
        "side": "key",
        "scale": 1.0,
        "query": 20,
        "key": 7,
        "freeze_patterns": False,
    }
    r = ok(post(client, "/api/intervene", body), S.InterveneResult)
    h = r.heads[0]
    assert abs(h.attention_after - h.attention_before) < 1e-5 and r.kl_divergence < 1e-6
    r0 = ok(post(client, "/api/intervene", {**body, "scale": 0.0}), S.InterveneResult)
    assert r0.heads[0].attention_before == pytest.approx(h.attention_before)
    assert abs(r0.heads[0].attention_after - h.attention_before) > 1e-7


# ----- bad inputs -> 4xx with a message -----------------------------------------------------------
QK = {"text": TEXT, "head": "L1H1", "query": 10, "key": 3}
IV = {"text": TEXT, "heads": ["L2H1"], "query": 10, "key": 3}
BAD = [
    ("/api/attribute/qk", {**QK, "head": "L3H0"}, "unknown head"),
    ("/api/attribute/qk", {**QK, "head": "L0H4"}, "unknown head"),
    ("/api/attribute/qk", {**QK, "head": "layer0"}, "malformed head"),
    ("/api/attribute/qk", {**QK, "query": 500}, "out of range"),
    ("/api/attribute/qk", {**QK, "key": -500}, "out of range"),
    ("/api/attribute/qk", {**QK, "query": 3, "key": 10}, "after query"),
    ("/api/attribute/qk", {**QK, "text": ""}, "text"),
    ("/api/attribute/qk", {**QK, "text": "   \n "}, "empty"),
    ("/api/attribute/qk", {**QK, "text": "x" * 2100}, "limit is 2048"),
    ("/api/attribute/qk", {**QK, "basis": "sae"}, "no dictionaries loaded"),
    ("/api/attribute/qk", {**QK, "colour": "red"}, "colour"),
    ("/api/attribute/qk", {"text": TEXT, "head": "L1H1", "query": 3}, "key: Field required"),
    ("/api/attribute/qk", {**QK, "query": "three"}, "query"),
    ("/api/attribute/qk", {**QK, "query": 2**70}, "query"),
    ("/api/attribute/qk", {**QK, "text": "bad \ud800 surrogate"}, "text: "),
    ("/api/attribute/ov", {**QK, "head": "L9H9"}, "unknown head"),
    ("/api/attribute/ov", {**QK, "query": 2, "key": 5}, "after query"),
    ("/api/composition", {**QK, "text": ""}, "text"),
    ("/api/rank-heads", {"text": TEXT, "query": 2, "key": 5}, "after query"),
    ("/api/rank-heads", {"text": TEXT, "query": 99, "key": 5}, "out of range"),
    ("/api/tokenize", {"text": "x" * 3000}, "limit is 2048"),
    ("/api/tokenize", {"text": 5}, "text"),
    ("/api/tokenize", {}, "text: Field required"),
    ("/api/tokenize", [], "body"),
    ("/api/attend", {"text": TEXT, "heads": ["L0H0", "L7H0"]}, "unknown head"),
    ("/api/attend", {"text": "y" * 2000, "heads": None}, "limit is 4,000,000"),
    ("/api/sweep", {"template": "no slot", "values": ["a"], "heads": ["L0H0"]}, "{}"),
    ("/api/sweep", {"template": "a {}", "values": [], "heads": ["L0H0"]}, "values"),
    ("/api/sweep", {"template": "a {}", "values": ["x"] * 1001, "heads": ["L0H0"]}, "values"),
    (
        "/api/sweep",
        {"template": "a {}", "values": {"start": 0, "stop": 5000}, "heads": ["L0H0"]},
        "limit is 1000",
    ),
    (
        "/api/sweep",
        {"template": "a {}", "values": {"start": 0, "stop": 5, "step": 0}, "heads": ["L0H0"]},
        "step must not be 0",
    ),
    ("/api/sweep", {"template": "a {}", "values": ["b"], "heads": ["L0H0"], "key": "mid"}, "key"),
    ("/api/sweep", {"template": "a {}", "values": ["b"], "heads": ["L5H0"]}, "unknown head"),
    ("/api/sweep", {"template": "a {}", "values": ["b"], "heads": ["L0H0"], "query": 1}, "after"),
    ("/api/geometry", {"queries": ["no mark"], "keys": ["[[k]]"]}, "[[token]]"),
    ("/api/geometry", {"queries": ["[[a]]"] * 201, "keys": ["[[k]]"]}, "queries"),
    ("/api/geometry", {"queries": [], "keys": ["[[k]]"]}, "queries"),
    ("/api/geometry", {"queries": ["[[a]]"], "keys": ["[[k]]"], "heads": ["L0H9"]}, "unknown head"),
    (
        "/api/intervene",
        {**IV, "component": "nonsense", "side": "key", "scale": 0.0},
        "component",
    ),
    (
        "/api/intervene",
        {**IV, "component": "L0H1", "side": "value", "scale": 0.0},
        "side",
    ),
    (
        "/api/intervene",
        {**IV, "component": "L0H1", "side": "key", "scale": 1e300},
        "scale",
    ),
    (
        "/api/intervene",
        {**IV, "heads": [], "component": "L0H1", "side": "key", "scale": 0},
        "heads",
    ),
]


@pytest.mark.parametrize(("path", "body", "needle"), BAD, ids=[f"{p}-{n}" for p, _, n in BAD])
def test_bad_input_is_4xx_with_a_message(client, path, body, needle):
    # json.dumps escapes to ASCII, so a lone surrogate travels as "\ud800" as a browser sends it.
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail, detail


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"{not json", "application/json"),
        (b'{"text": "a", "head": "L0H0", "query": NaN, "key": 0}', "application/json"),
        (b'{"text": "hi"}', "text/plain"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        (b"", "application/json"),
    ],
)
def test_malformed_bodies(client, content, ctype):
    r = client.post("/api/attribute/qk", content=content, headers={"content-type": ctype})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]


def test_nan_scale_rejected(client):
    body = json.dumps({**IV, "component": "L0H1", "side": "key"})
    r = client.post(
        "/api/intervene",
        content=body[:-1] + ', "scale": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "scale" in r.json()["detail"]


def test_oversized_body_is_413(client):
    r = client.post("/api/tokenize", json={"text": "x" * (17 << 20)})
    assert r.status_code == 413


def test_oversized_chunked_body_is_413(client):
    def chunks():  # no Content-Length: the server counts what it reads
        yield b'{"text": "'
        for _ in range(17):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = client.post("/api/tokenize", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_endpoint_and_method(client):
    assert client.post("/api/nothing", json={}).status_code == 404
    r = client.get("/api/attribute/qk")
    assert 400 <= r.status_code < 500 and r.json()["detail"]


def test_masked_key_score_is_null_not_500():
    # gemma2's tiny model has a sliding window of 4 on layers 0 and 2: far keys score -inf.
    sess = Session(tiny_adapter("gemma2"))
    c = TestClient(create_app(None, sess), raise_server_exceptions=False)
    r = c.post("/api/rank-heads", json={"text": TEXT, "query": 30, "key": 2})
    assert r.status_code == 200, r.text
    body = ok(r, S.RankHeadsResult)
    masked = [h for h in body.heads if h.score is None]
    assert masked and all(h.attention == 0.0 for h in masked)
    body = {**QK, "head": "L0H1", "query": 30, "key": 2}
    qk = ok(c.post("/api/attribute/qk", json=body), S.QKResult)
    assert qk.masked and qk.attention == 0.0


# ----- no model -----------------------------------------------------------------------------------
def test_without_a_model_live_is_503_static_works(run_dir):
    c = TestClient(create_app(run_dir, None))
    h = ok(c.get("/api/health"), HealthResponse)
    assert h.model is None and h.n_layers is None and h.run == "myrun"
    for path, body in [("/api/tokenize", {"text": "a"}), ("/api/attribute/qk", QK)]:
        r = c.post(path, json=body)
        assert r.status_code == 503 and r.json()["detail"].startswith("no model loaded")
    assert c.get("/run/manifest.json").json()["status"] == "complete"


# ----- static files -------------------------------------------------------------------------------
def test_app_is_served(client):
    from headscope.server.app import APP_DIR

    if not (APP_DIR / "index.html").is_file():
        pytest.skip("no browser app in this checkout")
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert r.text == (APP_DIR / "index.html").read_text()
    for path in ("/main.js", "/app/main.js"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert client.get("/app/").text == (APP_DIR / "index.html").read_text()
    assert client.get("/lib").status_code == 404  # a directory: no listing
    assert client.get("/no-such-file.js").status_code == 404


def test_run_files_are_served(run_dir):
    c = TestClient(create_app(run_dir, None))
    assert c.get("/run/manifest.json").json()["schema_version"] == 1
    assert c.get("/run/manifest.json").headers["content-type"] == "application/json"
    assert c.get("/run/heads/L0H0.json").json() == {"head": "L0H0"}
    assert c.get("/run/alias.json").status_code == 200  # a symlink that stays inside is fine
    assert c.head("/run/manifest.json").status_code == 200


ESCAPES = [
    "/run/%2e%2e/secret.txt",
    "/run/%2E%2E/secret.txt",
    "/run/heads/%2e%2e/%2e%2e/secret.txt",
    "/run/..%2fsecret.txt",
    "/run/%2e%2e%2fsecret.txt",
    "/run/%2fetc%2fpasswd",
    "/run//etc/passwd",
    "/run/escape.txt",
    "/run/escape_dir/secret.txt",
    "/run/heads",
    "/run/heads/",
    "/run/",
    "/run",
    "/run/.",
    "/run/%00manifest.json",
    "/run/heads\\..\\..\\secret.txt",
    "/run/nope.json",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_nothing_outside_the_run_is_served(run_dir, path):
    c = TestClient(create_app(run_dir, None))
    r = c.get(path)
    assert r.status_code == 404, (path, r.text)
    assert "TOP SECRET" not in r.text and "root:" not in r.text


@pytest.mark.parametrize(
    "raw", ["/run/../secret.txt", "/run/heads/../../secret.txt", "/../secret.txt"]
)
def test_raw_dot_dot_over_a_real_socket(run_dir, raw):
    # HTTP clients normalise "..", so send the request line by hand to a real server.
    with serve(run_dir) as handle:
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
        conn.putrequest("GET", raw, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    assert resp.status == 404 and b"TOP SECRET" not in body


def test_no_run_means_404(client):
    r = client.get("/run/manifest.json")
    assert r.status_code == 404 and "no run" in r.json()["detail"]


def test_missing_run_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        create_app(tmp_path / "nope", None)


# ----- access token and Host check ----------------------------------------------------------------
def test_token_required_when_set(session, run_dir):
    c = TestClient(create_app(run_dir, session, token="s3cret"))
    r = c.get("/api/health")
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.post("/api/tokenize", json={"text": "a"}).status_code == 401
    assert c.get("/run/manifest.json").status_code == 401
    assert c.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/health?token=wrong").status_code == 401
    assert c.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.post("/api/tokenize?token=s3cret", json={"text": "a"}).status_code == 200
    # The app page opened with ?token= gets a cookie so its own fetches are authorised.
    page = c.get("/?token=s3cret")
    assert TOKEN_COOKIE in page.headers.get("set-cookie", "")
    assert "samesite=strict" in page.headers["set-cookie"].lower()
    fresh = TestClient(create_app(run_dir, session, token="s3cret"))
    fresh.cookies.set(TOKEN_COOKIE, "s3cret")
    assert fresh.get("/api/health").status_code == 200
    assert fresh.get("/run/manifest.json").status_code == 200


def test_host_header_checked_when_asked(session):
    app = create_app(None, session, allowed_hosts={"127.0.0.1", "localhost", "::1"})
    assert TestClient(app, base_url="http://127.0.0.1:8123").get("/api/health").status_code == 200
    assert TestClient(app, base_url="http://localhost").get("/api/health").status_code == 200
    assert TestClient(app, base_url="http://[::1]:9").get("/api/health").status_code == 200
    r = TestClient(app, base_url="http://evil.example:8123").get("/api/health")
    assert r.status_code == 403


def test_openapi_has_the_contract(client):
    spec = client.get("/openapi.json").json()
    assert {
        "/api/health",
        "/api/tokenize",
        "/api/attend",
        "/api/rank-heads",
        "/api/attribute/qk",
        "/api/attribute/ov",
        "/api/composition",
        "/api/sweep",
        "/api/geometry",
        "/api/intervene",
    } <= set(spec["paths"])
    names = set(spec["components"]["schemas"])
    assert {"QKRequest", "QKResult", "SweepRequest", "ErrorResponse"} <= names
    assert client.get("/docs").status_code == 404  # Swagger UI needs a CDN


# ----- the model queue ----------------------------------------------------------------------------
def test_full_queue_answers_503_busy(session):
    app = create_app(None, session, queue_size=1)
    c = TestClient(app, raise_server_exceptions=False)
    gate = threading.Event()
    running = app.state.queue.try_submit(gate.wait)  # occupies the worker
    waiting = app.state.queue.try_submit(lambda: None)  # fills the one waiting slot
    try:
        r = c.post("/api/rank-heads", json={"text": "a new text", "query": -1, "key": 1})
        assert r.status_code == 503 and r.json()["detail"].startswith("busy, retry")
        assert r.headers["retry-after"] == "1"
        assert c.get("/api/health").status_code == 200  # health never waits for the model
        # work that needs no forward pass is answered beside the model queue
        assert c.post("/api/tokenize", json={"text": "a"}).status_code == 200
    finally:
        gate.set()
    running.result(5)
    waiting.result(5)
    assert c.post("/api/tokenize", json={"text": "a"}).status_code == 200


def test_model_calls_run_one_at_a_time(session):
    active, peak, lock = [0], [0], threading.Lock()
    real = session.adapter.run

    def tracked(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    session.adapter.run = tracked
    try:
        with serve(model=session) as handle:

            def hit(i):
                body = {"text": f"text number {i} " * 3, "query": -1, "key": 1}
                assert httpx.post(handle.url + "api/rank-heads", json=body).status_code == 200

            threads = [threading.Thread(target=hit, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        del session.adapter.run
    assert peak[0] == 1


# ----- serve() ------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    s = socket.socket()
    # SO_REUSEADDR as every server sets it: lets closed connections linger in TIME_WAIT, but
    # still fails while anything is listening on the port.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_serve_handle_starts_answers_and_stops(session, run_dir):
    handle = serve(run_dir, session)
    try:
        assert handle.url == f"http://127.0.0.1:{handle.port}/" and handle.port > 0
        assert handle.token is None and handle.running
        # Connections of a proto-0 socket keep Nagle on: 40 ms per keep-alive response.
        assert handle._sock.proto == socket.IPPROTO_TCP
        h = httpx.get(handle.url + "api/health").json()
        assert h["model"] == "tiny-llama" and h["run"] == "myrun"
        body = {"text": TEXT, "head": "L1H0", "query": -1, "key": 2}
        qk = httpx.post(handle.url + "api/attribute/qk", json=body).json()
        assert abs(qk["total"] - qk["score"]) <= 1e-4
        # Loopback servers refuse foreign Host names (DNS rebinding).
        r = httpx.get(handle.url + "api/health", headers={"Host": "evil.example"})
        assert r.status_code == 403
    finally:
        handle.stop()
    assert not handle.running
    assert _port_free(handle.port)
    with pytest.raises(httpx.TransportError):
        httpx.get(handle.url + "api/health", timeout=2)


def test_serve_two_at_once_get_different_ports():
    with serve() as a, serve() as b:
        assert a.port != b.port
        assert httpx.get(a.url + "api/health").json()["model"] is None


def test_serve_off_loopback_warns_and_requires_a_token(monkeypatch, capsys, session):
    # Pretend 127.0.0.1 is a public interface, so nothing is exposed while testing the policy.
    serve_mod = importlib.import_module("headscope.server.serve")
    monkeypatch.setattr(serve_mod, "is_loopback", lambda host: False)
    with serve(model=session) as handle:
        assert handle.token and len(handle.token) >= 24
        assert "WARNING" in capsys.readouterr().err
        assert httpx.get(handle.url + "api/health").status_code == 401
        r = httpx.get(handle.url + "api/health", headers=handle.headers())
        assert r.status_code == 200
        assert handle.browser_url.endswith(f"?token={handle.token}")


def test_serve_block_runs_until_ctrl_c():
    # A command started with & by a non-interactive shell (as CI runners may start the suite)
    # inherits SIGINT ignored, and so would this child: give it the default Ctrl-C behaviour
    # a terminal user has.
    code = (
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from headscope.server import serve\n"
        "h = serve(block=True)\n"
        "print('stopped', h.running, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        banner = proc.stderr.readline()
        assert "serving" in banner and "http://127.0.0.1:" in banner, banner
        url = banner[banner.index("http://") :].split()[0]
        assert httpx.get(url + "api/health").json()["model"] is None
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped False" in out


def test_is_loopback():
    from headscope.server.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("example.com")


def test_results_are_serialised_by_pydantic_with_non_finite_floats_as_null():
    import json as _json

    from headscope.server.responses import JSON, result_response

    ranked = S.RankHeadsResult.model_construct(
        tokens=["a"], query=0, key=0, heads=[S.RankedHead(head="L0H0", attention=1.0, score=None)]
    )
    fast = result_response(ranked)
    assert fast.media_type == "application/json"
    assert _json.loads(fast.body) == _json.loads(JSON(ranked.model_dump()).body)
    odd = S.TokenizeResult(tokens=["\ud800", "x"], ids=[1, 2])  # pydantic cannot encode this
    assert _json.loads(result_response(odd).body)["tokens"] == ["\ud800", "x"]
    inf = S.RankedHead(head="L0H0", attention=float("nan"), score=float("-inf"))
    assert _json.loads(result_response(inf).body) == {
        "head": "L0H0",
        "attention": None,
        "score": None,
    }
