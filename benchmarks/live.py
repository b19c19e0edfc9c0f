"""Latency of the live server with the default model, measured through HTTP on 127.0.0.1.

    python benchmarks/live.py [--model default] [--reps 20] [--tokens 256]

Prints p50/p95 of: QK attribution on a new text for a head drawn uniformly from all layers (the
forward pass runs up to that head's layer, then the attribution; the layers are drawn without
replacement, every layer once per ``n_layers`` texts, so the p50 is that of a uniform draw and
not of whichever layers 20 random draws happened to hit), QK attribution on an
already-seen text (another head of a layer already run, another pair: no forward pass), head
ranking on a seen text (continues the text's pass to the last layer the first time), and, in
the same process on the same texts, the model's own full fp32 forward pass (logits included,
fused attention, nothing captured). Targets (printed, not asserted): new text p50 < 200 ms,
seen text p50 < 15 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import httpx

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "more",
    "out",
    "can",
    "who",
    "up",
    "said",
    "about",
    "them",
    "some",
    "could",
    "him",
    "into",
    "its",
    "then",
    "two",
    "only",
    "river",
    "Paris",
    "1776",
    "mountain",
    "quickly",
    "because",
    "although",
    "library",
    "window",
    "seventeen",
    "Zambia",
]


def make_text(client: httpx.Client, rng: random.Random, n_tokens: int) -> str:
    """A fresh text of exactly ``n_tokens`` tokens (BOS included), checked with /api/tokenize."""
    words = [rng.choice(WORDS) for _ in range(n_tokens * 2)]
    text = f"{rng.randrange(10**12)} " + " ".join(words)
    tokens = client.post("/api/tokenize", json={"text": text}).json()["tokens"]
    text = "".join(tokens[1:n_tokens])
    got = len(client.post("/api/tokenize", json={"text": text}).json()["tokens"])
    if got != n_tokens:  # a re-tokenisation merged across the cut; try another text
        return make_text(client, rng, n_tokens)
    return text


def timed(client: httpx.Client, path: str, body: dict) -> float:
    t0 = time.perf_counter()
    r = client.post(path, json=body)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt


def summary(name: str, seconds: list[float], target_ms: float | None = None) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    p50 = statistics.median(ms)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    verdict = ""
    if target_ms is not None:
        verdict = f"  target p50 < {target_ms:.0f} ms: {'met' if p50 < target_ms else 'MISSED'}"
    return f"{name:<34} n={len(ms):<3} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms{verdict}"


def model_forward(session, text: str) -> float:
    """Seconds of the model's own forward pass over ``text`` (what ``model(ids)`` costs)."""
    import torch

    from headscope.analysis.inputs import encode_text

    ad = session.adapter
    ids = encode_text(ad, text, session.max_tokens)
    with torch.no_grad():
        t0 = time.perf_counter()
        ad.model(input_ids=ids.to(ad.device), use_cache=False)
        if ad.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--reps",
        type=int,
        default=30,
        help="texts (default: 30, one per layer of the default model)",
    )
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    args = ap.parse_args(argv)

    import os

    import torch

    from headscope.analysis.session import Session
    from headscope.model import ModelAdapter
    from headscope.server import serve

    t0 = time.perf_counter()
    session = Session(ModelAdapter.load(args.model, device=args.device))
    handle = serve(model=session)
    print(
        f"model {args.model} loaded and serving at {handle.url} in {time.perf_counter() - t0:.1f} s"
    )
    rng = random.Random(args.seed)
    try:
        with httpx.Client(base_url=handle.url, timeout=120) as client:
            health = client.get("/api/health").json()
            heads = [
                f"L{la}H{h}" for la in range(health["n_layers"]) for h in range(health["n_heads"])
            ]
            n = args.tokens
            texts = [make_text(client, rng, n) for _ in range(args.reps + 3)]
            new, seen, rank, forward, layers = [], [], [], [], []
            n_heads, n_layers = health["n_heads"], health["n_layers"]
            # the warm-up texts, then every layer once per n_layers texts, in a shuffled order
            draw = [rng.randrange(n_layers) for _ in range(3)]
            while len(draw) < len(texts):
                draw += rng.sample(range(n_layers), n_layers)
            for i, text in enumerate(texts):
                layer = draw[i]
                head = heads[layer * n_heads + rng.randrange(n_heads)]
                q = rng.randrange(n // 2, n)
                body = {"text": text, "head": head, "query": q, "key": rng.randrange(0, q + 1)}
                t_new = timed(client, "/api/attribute/qk", body)
                # another head of a layer the pass has run, another pair: from the cache
                other_head = rng.choice(heads[: (layer + 1) * n_heads])
                other = {**body, "head": other_head, "key": rng.randrange(0, q + 1)}
                t_seen = timed(client, "/api/attribute/qk", other)
                pair = {"text": text, "query": q, "key": rng.randrange(0, q + 1)}
                timed(client, "/api/rank-heads", pair)  # continues the pass to the end
                t_rank = timed(client, "/api/rank-heads", {**pair, "key": 0})
                t_fwd = model_forward(session, text)
                if i >= 3:  # the first few warm up torch and the allocator
                    new.append(t_new)
                    seen.append(t_seen)
                    rank.append(t_rank)
                    forward.append(t_fwd)
                    layers.append(layer)
    finally:
        handle.stop()

    load = os.getloadavg()
    print(
        f"{health['model']}: {health['n_layers']} layers x {health['n_heads']} heads, "
        f"{n}-token texts, {args.reps} texts (heads from layers {sorted(layers)}), client and "
        f"server on 127.0.0.1; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(summary("model's own forward pass (fp32)", forward))
    print(summary("QK attribution, new text", new, 200))
    print(summary("QK attribution, seen text", seen, 15))
    print(summary("rank heads, seen text", rank))
    f50, n50 = statistics.median(forward), statistics.median(new)
    print(f"new-text QK p50 / model forward p50: {n50 / f50:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
