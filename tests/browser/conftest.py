"""Fixtures for the browser tests: headless Chromium, a synthetic run served statically, a fake
live API (Playwright request routing) for the live views, and the console-error guard.

Tiers: tests marked `browser` need Playwright and a Chromium binary (Debian's /usr/bin/chromium
by default, or $HEADSCOPE_CHROMIUM) and never touch the network. Tests also marked `live` run
against a real `headscope serve` at $HEADSCOPE_LIVE_URL and are skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from static_server import StaticServer  # noqa: E402
from synthetic_run import BOS, _pattern, _tokenize, write_synthetic_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "src" / "headscope" / "app"
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("HEADSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SMALL = {"n_layers": 6, "n_heads": 8, "seed": 0}
BIG = {"n_layers": 80, "n_heads": 64, "seed": 1}
BIG_PAYLOAD = ["L0H0", "L40H10", "L79H63"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "live: needs a running `headscope serve` at $HEADSCOPE_LIVE_URL"
    )


# ------------------------------------------------------------------ browser


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HEADSCOPE_CHROMIUM)"
        )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator:
    """A fresh page; fails the test if the page logged any console error or threw."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on(
        "console",
        lambda m: (
            errors.append(f"console.{m.type}: {m.text} @ {m.location}")
            if m.type == "error"
            else None
        ),
    )
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    pg.console_errors = errors
    yield pg
    pg.wait_for_timeout(50)
    context.close()
    assert not errors, "errors in the browser console:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def shot():
    """shot(page_or_locator, name, full_page=True): save test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(target, name: str, full_page: bool = True) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        if hasattr(target, "goto"):
            target.screenshot(path=str(path), full_page=full_page)
        else:
            target.screenshot(path=str(path))
        return path

    return save


# ------------------------------------------------------------------ sites


def make_site(root: Path, **run_kwargs) -> Path:
    """Copy the app to `root` and write a synthetic run to `root/run` (a static export)."""
    shutil.copytree(APP_DIR, root, dirs_exist_ok=True)
    write_synthetic_run(root / "run", **run_kwargs)
    return root


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    return make_site(tmp_path_factory.mktemp("site"), **SMALL)


@pytest.fixture(scope="session")
def app_url(site) -> Iterator[str]:
    """URL of index.html of the static copy (no live server)."""
    with StaticServer(site) as server:
        yield server.url + "index.html"


@pytest.fixture(scope="session")
def big_app_url(tmp_path_factory) -> Iterator[str]:
    """A 5,120-head static copy (80 layers × 64 heads), payloads for BIG_PAYLOAD only."""
    root = make_site(tmp_path_factory.mktemp("bigsite"), **BIG, payload_heads=BIG_PAYLOAD)
    with StaticServer(root) as server:
        yield server.url + "index.html"


@pytest.fixture(scope="session")
def run_dir(site) -> Path:
    return site / "run"


# ------------------------------------------------------------------ fake live API


class FakeApi:
    """Answers the live API contract (docs/app.md) with deterministic synthetic data, through
    Playwright request routing, so the live views can be exercised without a model."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.calls: list[str] = []

    # -- helpers
    def tokens(self, text: str) -> list[str]:
        return [BOS, *_tokenize(text)]

    def heads(self) -> list[str]:
        return [f"L{li}H{hi}" for li in range(self.n_layers) for hi in range(self.n_heads)]

    def pattern(self, head: str, toks: list[str]) -> np.ndarray:
        seed = zlib.crc32(head.encode())
        behaviour = ["prev", "induction", "same", "newline", "local", "sink", "year"][seed % 7]
        return _pattern(toks, behaviour, 2.0 + seed % 5, np.random.default_rng(seed))

    def check_head(self, head: str) -> None:
        m = re.fullmatch(r"L(\d+)H(\d+)", head or "")
        if not m or int(m[1]) >= self.n_layers or int(m[2]) >= self.n_heads:
            raise ValueError(f"unknown head {head!r}")

    # -- endpoints
    def health(self, _body):
        return {
            "model": "fake-model",
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "run": "synthetic",
        }

    def tokenize(self, body):
        return {"tokens": self.tokens(body["text"])}

    def attend(self, body):
        toks = self.tokens(body["text"])
        heads = body.get("heads") or self.heads()
        for h in heads:
            self.check_head(h)
        return {
            "tokens": toks,
            "patterns": {h: np.round(self.pattern(h, toks), 4).tolist() for h in heads},
        }

    def rank_heads(self, body):
        toks = self.tokens(body["text"])
        q, k = int(body["query"]), int(body["key"])
        rows = []
        for h in self.heads():
            a = float(self.pattern(h, toks)[q, k])
            rows.append(
                {"head": h, "attention": round(a, 4), "score": round(math.log(a + 1e-6) + 5, 4)}
            )
        rows.sort(key=lambda r: -r["attention"])
        return {"tokens": toks, "heads": rows}

    def attribute_qk(self, body):
        self.check_head(body["head"])
        toks = self.tokens(body["text"])
        rng = np.random.default_rng(zlib.crc32(json.dumps(body, sort_keys=True).encode()))
        layer = int(body["head"][1:].split("H")[0])
        comps = ["embed", "pos_embed", "bias"]
        comps += [f"L{li}H{hi}" for li in range(layer) for hi in range(2)]
        comps += [f"L{li}.mlp" for li in range(layer)]
        terms = [
            {"query": a, "key": b, "value": float(rng.laplace(0, 0.3))}
            for a in comps
            for b in comps
        ]
        total = sum(t["value"] for t in terms)
        terms.sort(key=lambda t: -abs(t["value"]))
        qm: dict[str, float] = {}
        km: dict[str, float] = {}
        for t in terms:
            qm[t["query"]] = qm.get(t["query"], 0.0) + t["value"]
            km[t["key"]] = km.get(t["key"], 0.0) + t["value"]

        def marg(m: dict[str, float]) -> list[dict]:
            rows = sorted(m.items(), key=lambda x: -abs(x[1]))
            return [{"component": c, "value": v} for c, v in rows]

        return {
            "head": body["head"],
            "query": body["query"],
            "key": body["key"],
            "tokens": toks,
            "score": total,
            "total": total,
            "capped_score": None,
            "attention": float(self.pattern(body["head"], toks)[body["query"], body["key"]]),
            "terms": terms[:200],
            "query_marginals": marg(qm),
            "key_marginals": marg(km),
        }

    def attribute_ov(self, body):
        self.check_head(body["head"])
        toks = self.tokens(body["text"])
        comps = ["embed", "pos_embed", "L0H1", "L0.mlp", "bias"]
        return {
            "head": body["head"],
            "query": body["query"],
            "key": body["key"],
            "tokens": toks,
            "attention": 0.5,
            "total_norm": 4.2,
            "terms": [
                {"component": c, "value_norm": 2.0 / (i + 1), "logit_top": [" Paris", " Spain"]}
                for i, c in enumerate(comps)
            ],
            "promoted": [{"token": " Paris", "logit": 3.1}, {"token": " Spain", "logit": 2.2}],
            "suppressed": [{"token": " the", "logit": -1.5}],
        }

    def composition(self, body):
        self.check_head(body["head"])
        toks = self.tokens(body["text"])
        k = int(body["key"])
        rows = [
            {
                "head": h,
                "value": round(0.9 / (i + 1), 4),
                "attends_to": max(0, k - i),
                "attends_to_token": toks[max(0, k - i)],
                "weight": 0.7,
            }
            for i, h in enumerate(self.heads()[:6])
        ]
        return {"k_composition": rows, "q_composition": rows[::-1]}

    def sweep(self, body):
        values = body["values"]
        out = {}
        for h in body["heads"]:
            self.check_head(h)
            scale = 0.5 + (zlib.crc32(h.encode()) % 50) / 100
            out[h] = [
                round(
                    scale / (1 + math.exp((float(v) - 1986) / 4))
                    if re.fullmatch(r"-?\d+", str(v))
                    else 0.3,
                    4,
                )
                for v in values
            ]
        toks = self.tokens(body["template"].replace("{}", str(values[0])))
        q = len(toks) - 1 if body.get("query") in ("last", "slot:-1") else int(body["query"])
        k = int(body["key"]) if str(body.get("key")).lstrip("-").isdigit() else 1
        positions = [
            {"value": str(v), "query": q, "key": k, "query_token": toks[q], "key_token": toks[k]}
            for v in values
        ]
        return {
            "template": body["template"],
            "values": values,
            "positions": positions,
            "attention": out,
        }

    def geometry(self, body):
        for prompt in body["queries"] + body["keys"]:
            if not re.search(r"\[\[.+\]\]", prompt):
                raise ValueError(f"prompt {prompt!r} must mark exactly one token as [[token]]")
        nq, nk = len(body["queries"]), len(body["keys"])
        rng = np.random.default_rng(nq * 31 + nk)

        def mat(sign):
            m = rng.uniform(-0.2, 0.2, size=(nq, nk))
            for i in range(min(nq, nk)):
                m[i, i] = sign * 0.6
            return np.round(m, 4).tolist()

        for h in body["heads"]:
            self.check_head(h)
        return {
            "heads": {h: {"cosine": mat(-1)} for h in body["heads"]},
            "residual": {"cosine": mat(1)},
            "query_labels": body["queries"],
            "key_labels": body["keys"],
        }

    def install(self, pg) -> FakeApi:
        routes = {
            "health": self.health,
            "tokenize": self.tokenize,
            "attend": self.attend,
            "rank-heads": self.rank_heads,
            "attribute/qk": self.attribute_qk,
            "attribute/ov": self.attribute_ov,
            "composition": self.composition,
            "sweep": self.sweep,
            "geometry": self.geometry,
        }

        def handle(route, request):
            path = request.url.split("/api/", 1)[1].split("?")[0]
            self.calls.append(path)
            fn = routes.get(path)
            if fn is None:
                route.fulfill(status=404, json={"detail": f"no endpoint {path}"})
                return
            try:
                body = json.loads(request.post_data or "{}")
                route.fulfill(status=200, json=fn(body))
            except (ValueError, KeyError, IndexError) as err:
                route.fulfill(
                    status=422, json={"detail": str(err.args[0]) if err.args else repr(err)}
                )

        pg.route("**/api/**", handle)
        return self


@pytest.fixture
def fake_api(page) -> FakeApi:
    """Install the fake live API on `page` (sized like the small synthetic run)."""
    return FakeApi(SMALL["n_layers"], SMALL["n_heads"]).install(page)


# ------------------------------------------------------------------ real live server


@pytest.fixture(scope="session")
def live_url() -> str:
    """Base URL of a running `headscope serve` (e.g. http://127.0.0.1:8000/)."""
    url = os.environ.get("HEADSCOPE_LIVE_URL")
    if not url:
        pytest.skip(
            "needs a live server: set HEADSCOPE_LIVE_URL to a running `headscope serve RUN --model M`"
        )
    return url if url.endswith("/") else url + "/"
