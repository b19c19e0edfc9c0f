"""A metrics-only synthetic run (docs/run-format.md) at sizes a real test run cannot reach.

Only the 5,120-head hover budget uses it: every functional browser test runs on a real run of
a tiny model (conftest.py). Each head gets a behaviour (previous token, induction, same token,
newline, local, sink, year); its metrics are measured on real softmax patterns computed from
that behaviour on a few packed text sequences, so the scatter has realistic structure.
`python tests/browser/synthetic_run.py OUT --layers 80 --heads 64` writes one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

BOS = "<|endoftext|>"

CORPUS = [
    "I had a dream of summer light,\nof fields that shone with silver gleam,\n"
    "I'm walking home through the night,\nI'm waking softly from the dream.\n",
    "In 1776 the colonies declared independence. In 1789 the constitution took effect, "
    "and by 1812 the young country was at war again.\n",
    "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n",
    "Question: Which city is the capital of France?\nA. Berlin\nB. Paris\nC. Madrid\n"
    "Answer: B. Paris\n",
    "Madrid, Barcelona, Seville, Valencia and Lyon are all cities in Spain.\n",
    "The interpretability of attention heads is an open problem. Interpretability "
    "research studies attention heads one at a time.\n",
    "Alice: Did you see the match last night?\nBob: The Knicks beat the Nets again.\n"
    "Alice: Kidd played well for the Nets.\n",
    "The review was glowing: a delightful film. Sentiment: positive.\n"
    "The review was harsh: a tedious film. Sentiment: negative.\n",
    "We've had a real laugh on the trip to Lusaka, and chikumbuso was the highlight "
    "of our week in Zambia.\n",
    "for i in range(10):\n    print(i)\n    total += i\nprint(total)\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox runs away.\n",
    "Roses are red,\nviolets are blue,\nsugar is sweet,\nand so are you.\n",
]

BEHAVIOURS = ["prev", "induction", "same", "newline", "local", "sink", "year"]

METRIC_DOCS = {
    "prev_token_score": "Mean attention from each token to the token right before it.",
    "induction_score": "Mean attention from a repeated token [A] to the token after its "
    "earlier occurrence ([A][B] ... [A] -> [B]).",
    "first_token_score": "Mean attention paid to the first token of the sequence (the sink).",
    "self_score": "Mean attention from each token to itself.",
    "same_token_score": "Mean attention to earlier copies of the same token.",
    "newline_score": "Mean attention from a newline to the previous newline.",
    "mean_entropy": "Mean entropy (nats) of the attention distribution of each query.",
    "mean_distance": "Attention-weighted mean distance between query and key, in tokens.",
    "max_attention": "Mean over sequences of the largest attention weight (key 0 excluded).",
}

TOKEN_RE = re.compile(r"\n|[ ]?\d(?=\d{3}\b)|\d{1,3}|[ ]?[A-Za-z']+|[ ]+(?=[ ])|[ ]?[^\w\s]|[ ]")


def _tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def _sequences(
    rng: np.random.Generator, n: int, lo: int, hi: int
) -> list[tuple[list[str], list[int]]]:
    """Pack corpus documents into `n` sequences of lo..hi tokens; returns (tokens, doc_starts)."""
    docs = [[BOS, *_tokenize(t)] for t in CORPUS]
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        toks: list[str] = []
        starts: list[int] = []
        while len(toks) < length:
            starts.append(len(toks))
            toks.extend(docs[int(rng.integers(len(docs)))])
        out.append((toks[:length], [s for s in starts if s < length]))
    return out


def _pattern(
    toks: list[str], behaviour: str, strength: float, rng: np.random.Generator
) -> np.ndarray:
    """Causal softmax attention pattern float[T, T] for one head on one sequence."""
    t = len(toks)
    scores = rng.normal(0.0, 0.6, size=(t, t))
    scores[:, 0] += 2.5
    ids = np.unique(np.array(toks), return_inverse=True)[1]
    same = ids[:, None] == ids[None, :]
    lower = np.tri(t, t, -1, dtype=bool)
    q, k = np.nonzero(lower)
    if behaviour == "prev":
        scores[np.arange(1, t), np.arange(t - 1)] += strength
    elif behaviour == "local":
        for d, w in ((1, 1.0), (2, 0.7), (3, 0.4)):
            scores[np.arange(d, t), np.arange(t - d)] += strength * w
    elif behaviour == "same":
        scores[q[same[q, k]], k[same[q, k]]] += strength
    elif behaviour == "induction":
        prev_same = np.zeros((t, t), dtype=bool)
        prev_same[1:, 1:] = same[:-1, :-1] & lower[:-1, :-1]
        m = prev_same & lower
        scores[m] += strength
    elif behaviour == "newline":
        nl = np.array([x == "\n" for x in toks])
        m = nl[:, None] & nl[None, :] & lower
        scores[m] += strength
    elif behaviour == "year":
        digit = np.array([x.strip().isdigit() and len(x.strip()) == 1 for x in toks])
        three = np.array([x.isdigit() and len(x) == 3 for x in toks])
        idx = np.nonzero(three[1:] & digit[:-1])[0] + 1
        scores[idx, idx - 1] += strength * 1.5
        multi = np.array([x[:1].isalpha() for x in toks])
        idx = np.nonzero(multi[1:] & multi[:-1])[0] + 1
        scores[idx, idx - 1] += strength * 0.4
    scores[~np.tri(t, t, 0, dtype=bool)] = -np.inf
    scores -= scores.max(axis=1, keepdims=True)
    p = np.exp(scores)
    return p / p.sum(axis=1, keepdims=True)


def _head_metrics(
    pats: list[np.ndarray], seqs: list[tuple[list[str], list[int]]]
) -> dict[str, float]:
    acc: dict[str, list[float]] = {k: [] for k in METRIC_DOCS}
    for p, (toks, _) in zip(pats, seqs, strict=True):
        t = len(toks)
        idx = np.arange(1, t)
        acc["prev_token_score"].append(float(p[idx, idx - 1].mean()))
        acc["first_token_score"].append(float(p[:, 0].mean()))
        acc["self_score"].append(float(np.diag(p).mean()))
        ids = np.unique(np.array(toks), return_inverse=True)[1]
        same = (ids[:, None] == ids[None, :]) & np.tri(t, t, -1, dtype=bool)
        acc["same_token_score"].append(float(p[same].mean()) if same.any() else 0.0)
        ind = np.zeros((t, t), dtype=bool)
        ind[1:, 1:] = same[:-1, :-1]
        ind &= np.tri(t, t, -1, dtype=bool)
        acc["induction_score"].append(float(p[ind].mean()) if ind.any() else 0.0)
        nl = np.array([x == "\n" for x in toks])
        nlm = nl[:, None] & nl[None, :] & np.tri(t, t, -1, dtype=bool)
        acc["newline_score"].append(float(p[nlm].mean()) if nlm.any() else 0.0)
        ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
        acc["mean_entropy"].append(float(ent.mean()))
        dist = np.arange(t)[:, None] - np.arange(t)[None, :]
        acc["mean_distance"].append(float((p * np.clip(dist, 0, None)).sum(axis=1).mean()))
        acc["max_attention"].append(float(p[1:, 1:].max()))
    return {k: round(float(np.mean(v)), 5) for k, v in acc.items()}


def write_synthetic_run(path: str | Path, n_layers: int, n_heads: int, seed: int) -> Path:
    """Write a metrics-only run directory at `path` (manifest, metrics, no head payloads) and
    return it: enough for the head selector at sizes a real test run cannot reach."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"L{li}H{hi}" for li in range(n_layers) for hi in range(n_heads)]
    seqs = _sequences(rng, 3, 48, 64)
    rows = []
    for hi, name in enumerate(names):
        layer, head = (int(x) for x in name[1:].split("H"))
        depth = layer / max(n_layers - 1, 1)
        weights = np.array([1.6 - depth, 0.3 + depth, 0.5, 0.4, 0.8 - 0.5 * depth, 0.6, 0.3])
        b = BEHAVIOURS[int(rng.choice(len(BEHAVIOURS), p=weights / weights.sum()))]
        s = float(rng.uniform(2.0, 7.0))
        pats = [
            _pattern(t, b, s, np.random.default_rng([seed, hi, j])) for j, (t, _) in enumerate(seqs)
        ]
        rows.append([layer, head, *_head_metrics(pats, seqs).values()])
    columns = ["layer", "head", *METRIC_DOCS]
    (root / "metrics.json").write_text(
        json.dumps({"columns": columns, "rows": rows, "docs": METRIC_DOCS})
    )
    df = pd.DataFrame(rows, columns=columns)
    df.insert(2, "name", names)
    df.to_parquet(root / "metrics.parquet")
    (root / "vocab.json").write_text("{}")
    manifest = {
        "schema_version": 1,
        "status": "complete",
        "config": {"name": f"synthetic-{n_layers}x{n_heads}", "seed": seed, "synthetic": True},
        "model": {
            "name": "synthetic",
            "n_layers": n_layers,
            "n_heads": n_heads,
            "architecture": "synthetic",
            "source": "tests/browser/synthetic_run.py",
        },
        "metrics": METRIC_DOCS,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_synthetic_run(args.out, args.layers, args.heads, args.seed))
