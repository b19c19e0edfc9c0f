"""Write a synthetic run directory (docs/run-format.md) with plausible random data.

The browser tests and app development need a run without a model: this module fakes one. Each
head gets a behaviour (previous token, induction, same token, newline, local, sink), real
softmax attention patterns are computed from that behaviour on small packed text sequences, and
every file the browser reads (metrics, head payloads, vocab, motif map, precomputed attributions)
is derived from those patterns, so the numbers in the UI are internally consistent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

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


def _example(
    seq_index: int, toks: list[str], starts: list[int], p: np.ndarray, ids: dict[str, int]
) -> dict:
    t = len(toks)
    masked = p.copy()
    masked[:, 0] = 0.0
    max_q = masked.max(axis=1)
    max_q[0] = 0.0
    off = p - np.diag(np.diag(p))
    max_k = off.max(axis=0)
    sparse = []
    for qi in range(t):
        row = p[qi, : qi + 1]
        top = np.argsort(-row)[:8]
        for ki in sorted(int(x) for x in top):
            w = round(float(row[ki]), 3)
            if w >= 0.03:
                sparse.append([qi, ki, w])
    return {
        "sequence": seq_index,
        "max_attention": round(float(max_q.max()), 4),
        "tokens": [ids[x] for x in toks],
        "doc_starts": starts,
        "max_as_query": [round(float(x), 4) for x in max_q],
        "max_as_key": [round(float(x), 4) for x in max_k],
        "sparse": sparse,
    }


def _top_tokens(pats, seqs, axis: int) -> list[dict]:
    mass: dict[str, float] = {}
    count: dict[str, int] = {}
    for p, (toks, _) in zip(pats, seqs, strict=True):
        m = p.copy()
        m[:, 0] = 0.0
        per = m.max(axis=1) if axis == 1 else (m - np.diag(np.diag(m))).max(axis=0)
        for tok, v in zip(toks, per, strict=True):
            mass[tok] = mass.get(tok, 0.0) + float(v)
            count[tok] = count.get(tok, 0) + 1
    rows = [{"token": k, "mass": round(mass[k] / count[k], 4), "count": count[k]} for k in mass]
    rows.sort(key=lambda r: -r["mass"] * np.sqrt(r["count"]))
    return rows[:12]


def _pca(pats, seqs, rng: np.random.Generator, clustered: bool) -> dict:
    pairs = []
    for si, (p, (toks, _)) in enumerate(zip(pats, seqs, strict=True)):
        t = len(toks)
        for qi in range(1, t):
            ki = int(np.argmax(p[qi, 1 : qi + 1])) + 1
            pairs.append((float(p[qi, ki]), si, qi, ki))
    pairs.sort(reverse=True)
    pairs = pairs[:160]
    points, cats = [], []
    for w, si, qi, ki in pairs:
        toks = seqs[si][0]
        qt, kt = toks[qi], toks[ki]
        if qt == "\n" and kt == "\n":
            cat = 0
        elif qt.isdigit() and kt.strip().isdigit():
            cat = 1
        elif qi - ki == 1:
            cat = 2
        else:
            cat = 3
        cats.append(cat)
        points.append(
            {
                "query": qt,
                "key": kt,
                "q_pos": qi,
                "k_pos": ki,
                "distance": qi - ki,
                "sequence": si,
                "norm": round(w * float(rng.uniform(2, 5)), 3),
            }
        )
    out: dict = {"points": points}
    for name in ("q", "k", "o"):
        centers = rng.normal(0, 3.0 if clustered else 0.6, size=(4, 3))
        coords = centers[np.array(cats, dtype=int)] + rng.normal(0, 1.0, size=(len(cats), 3))
        coords -= coords.mean(axis=0)
        var = coords.var(axis=0)
        order = np.argsort(-var)
        coords = coords[:, order]
        ratio = var[order] / (var.sum() * 1.6)
        out[name] = {
            "coords": [[round(float(x), 4) for x in row] for row in coords],
            "variance_ratio": [round(float(x), 4) for x in ratio],
        }
    return out


def _attributions(head: str, layer: int, toks: list[str], p: np.ndarray, rng) -> dict:
    """Precomputed QK (SAE basis) and OV attributions for the strongest pair of pattern `p`."""
    masked = p.copy()
    masked[:, 0] = 0.0
    qi, ki = np.unravel_index(int(np.argmax(masked)), masked.shape)
    qi, ki = int(qi), int(ki)
    comps = ["embed", "pos_embed", "bias"]
    for li in range(layer):
        comps += [f"sae:L{li}/{int(i)}" for i in rng.choice(16384, size=5, replace=False)]
        comps += [f"sae:L{li}/error", f"sae:L{li}/b_dec"]
    qcomps = [c for c in comps if c != "bias"][:14] + ["bias"]
    kcomps = [c for c in comps if c != "bias"][2:18] + ["bias"]
    terms = []
    for qc in qcomps:
        for kc in kcomps:
            v = float(rng.laplace(0, 0.05))
            terms.append({"query": qc, "key": kc, "value": v})
    terms[int(rng.integers(len(terms)))]["value"] = 2.3
    terms[int(rng.integers(len(terms)))]["value"] = 1.4
    terms[int(rng.integers(len(terms)))]["value"] = -0.9
    total = float(sum(t["value"] for t in terms))
    qm: dict[str, float] = {}
    km: dict[str, float] = {}
    for t in terms:
        qm[t["query"]] = qm.get(t["query"], 0.0) + t["value"]
        km[t["key"]] = km.get(t["key"], 0.0) + t["value"]
    terms.sort(key=lambda t: -abs(t["value"]))
    for t in terms:
        t["value"] = round(t["value"], 6)
    features = {}
    words = ["rhyme", "line end", "newline after 'ee' sound", "current token is \\n", "poetry"]
    for c in comps:
        if re.fullmatch(r"sae:L\d+/\d+", c):
            features[c] = {
                "label": words[int(rng.integers(len(words)))],
                "top_contexts": ["".join(toks[max(0, i - 6) : i + 1]) for i in (qi, ki, 5)],
                "promoted": [" gleam", " dream", "\n", " seem"][: int(rng.integers(1, 5))],
                "density": round(float(rng.uniform(1e-5, 1e-2)), 6),
            }

    def marg(m: dict[str, float]) -> list[dict]:
        rows = sorted(m.items(), key=lambda r: -abs(r[1]))
        return [{"component": c, "value": round(v, 6)} for c, v in rows]

    qk = {
        "head": head,
        "query": qi,
        "key": ki,
        "basis": "sae",
        "tokens": toks,
        "score": round(total + 3e-7, 6),
        "total": round(total, 6),
        "capped_score": None,
        "attention": round(float(p[qi, ki]), 4),
        "terms": terms[:200],
        "query_marginals": marg(qm),
        "key_marginals": marg(km),
        "features": features,
    }
    outs = [" gleam", " dream", "\n", " seem", " beam", " stream", " the", ","]
    ov_terms = []
    for c in comps[:12]:
        ov_terms.append(
            {
                "component": c,
                "value_norm": round(float(rng.gamma(2.0, 0.6)), 4),
                "logit_top": list(rng.choice(outs, size=3, replace=False)),
            }
        )
    ov_terms.sort(key=lambda t: -t["value_norm"])
    ov = {
        "head": head,
        "query": qi,
        "key": ki,
        "basis": "sae",
        "tokens": toks,
        "attention": round(float(p[qi, ki]), 4),
        "total_norm": round(float(sum(t["value_norm"] for t in ov_terms)), 4),
        "terms": ov_terms,
        "promoted": [
            {"token": o, "logit": round(3.2 - 0.4 * i, 3)} for i, o in enumerate(outs[:6])
        ],
        "suppressed": [
            {"token": o, "logit": round(-2.1 + 0.3 * i, 3)}
            for i, o in enumerate([" night", " day", " and", "."])
        ],
    }
    return {"qk": qk, "ov": ov}


def _knn(
    z: np.ndarray, rows: np.ndarray, pool: np.ndarray, k: int = 8
) -> dict[int, list[tuple[int, float]]]:
    """For each row index, its k nearest pool indices (itself excluded) by Euclidean distance."""
    out: dict[int, list[tuple[int, float]]] = {}
    zp = z[pool]
    sq_pool = (zp * zp).sum(axis=1)
    for start in range(0, len(rows), 512):
        chunk = rows[start : start + 512]
        zc = z[chunk]
        d2 = (zc * zc).sum(axis=1)[:, None] + sq_pool[None, :] - 2 * zc @ zp.T
        d = np.sqrt(np.clip(d2, 0, None))
        d[pool[None, :] == chunk[:, None]] = np.inf
        kk = min(k, max(0, len(pool) - 1))
        top = np.argsort(d, axis=1)[:, :kk]
        for r, i in enumerate(chunk):
            out[int(i)] = [(int(pool[j]), float(d[r, j])) for j in top[r]]
    return out


def write_synthetic_run(
    path: str | Path,
    n_layers: int,
    n_heads: int,
    seed: int,
    *,
    payload_heads: Iterable[str] | None = None,
    n_sequences: int = 48,
) -> Path:
    """Write a complete synthetic run directory at `path` and return it.

    `payload_heads` limits which heads get a `heads/L{l}H{h}.json` payload (default: all); the
    performance tests use it to make a 5,120-head run without writing 5,120 payloads. Metrics,
    the motif map and `similar` lists cover every head; `similar` only names heads with a
    payload so the browser can always open them. The first payload head with an induction-like
    behaviour gets precomputed QK/OV attributions for its top example, listed in the manifest's
    `attributions` key (paths relative to `attributions/`).
    """
    root = Path(path)
    (root / "heads").mkdir(parents=True, exist_ok=True)
    (root / "motifs").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"L{li}H{hi}" for li in range(n_layers) for hi in range(n_heads)]
    payload = set(names if payload_heads is None else payload_heads)

    seqs = _sequences(rng, n_sequences, 48, 140)
    metric_seqs = [(toks[:64], starts) for toks, starts in seqs[:3]]
    vocab_list = sorted({tok for toks, _ in seqs for tok in toks}, key=lambda x: (x != BOS, x))
    ids = {tok: i for i, tok in enumerate(vocab_list)}

    behaviours, strengths, rows, metric_rows = [], [], [], []
    for hi, name in enumerate(names):
        layer, head = (int(x) for x in name[1:].split("H"))
        depth = layer / max(n_layers - 1, 1)
        weights = np.array([1.6 - depth, 0.3 + depth, 0.5, 0.4, 0.8 - 0.5 * depth, 0.6, 0.3])
        b = BEHAVIOURS[int(rng.choice(len(BEHAVIOURS), p=weights / weights.sum()))]
        s = float(rng.uniform(2.0, 7.0))
        behaviours.append(b)
        strengths.append(s)
        pats = [
            _pattern(t, b, s, np.random.default_rng([seed, hi, j]))
            for j, (t, _) in enumerate(metric_seqs)
        ]
        m = _head_metrics(pats, metric_seqs)
        metric_rows.append(m)
        rows.append([layer, head, *m.values()])
    columns = ["layer", "head", *METRIC_DOCS]

    feats = np.array([[r[c] for c in METRIC_DOCS] for r in metric_rows])
    z = (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-9)
    payload_idx = np.array([i for i, n in enumerate(names) if n in payload], dtype=int)
    all_idx = np.arange(len(names))
    near_all = _knn(z, all_idx, all_idx)
    near_payload = _knn(z, payload_idx, payload_idx)

    def nearest(i: int, table: dict[int, list[tuple[int, float]]]) -> list[dict]:
        return [{"head": names[j], "distance": round(d, 4)} for j, d in table[i]]

    u, _, _ = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    iso = u[:, :2] * 10
    beh_idx = np.array([BEHAVIOURS.index(b) for b in behaviours])
    angle = beh_idx / len(BEHAVIOURS) * 2 * np.pi
    tsne = np.stack([np.cos(angle), np.sin(angle)], axis=1) * 20 + rng.normal(
        0, 3.0, size=(len(names), 2)
    )
    motif_map = {
        "heads": names,
        "isomap": [[round(float(a), 4), round(float(b), 4)] for a, b in iso],
        "tsne": [[round(float(a), 4), round(float(b), 4)] for a, b in tsne],
        "nearest": {names[i]: nearest(i, near_all) for i in range(len(names))},
    }
    (root / "motifs" / "map.json").write_text(json.dumps(motif_map))
    np.save(
        root / "motifs" / "embedding.npy",
        rng.normal(size=(len(names), n_sequences, 16)).astype(np.float32),
    )

    attribution_files: list[str] = []
    for i, name in enumerate(names):
        if name not in payload:
            continue
        layer, head = (int(x) for x in name[1:].split("H"))
        b, s = behaviours[i], strengths[i]
        pats = [
            _pattern(t, b, s, np.random.default_rng([seed, i, 1000 + j]))
            for j, (t, _) in enumerate(seqs)
        ]
        maxes = np.array([float(p[1:, 1:].max()) for p in pats])
        counts, edges = np.histogram(maxes, bins=20, range=(0.0, 1.0))
        order = np.argsort(-maxes)
        examples, buckets = [], []
        for d in range(9, -1, -1):
            lo, hi = d / 10, (d + 1) / 10
            members = [
                int(j) for j in order if lo <= maxes[j] < hi or (d == 9 and maxes[j] == 1.0)
            ][:3]
            idx = []
            for j in members:
                idx.append(len(examples))
                toks, starts = seqs[j]
                examples.append(_example(j, toks, starts, pats[j], ids))
            buckets.append({"lo": lo, "hi": hi, "examples": idx})
        base = min(0.95, 0.15 + s / 10) if b == "induction" else 0.05 * s / 7
        curve = [round(base * (1 - 0.6 ** (n + 1)), 4) for n in range(4)]
        payload_json = {
            "head": name,
            "layer": layer,
            "index": head,
            "metrics": metric_rows[i],
            "curves": {"long_prefix_induction": curve},
            "histogram": {
                "edges": [round(float(e), 4) for e in edges],
                "counts": [int(c) for c in counts],
            },
            "buckets": buckets,
            "examples": examples,
            "top_query_tokens": _top_tokens(pats, seqs, 1),
            "top_key_tokens": _top_tokens(pats, seqs, 0),
            "pca": _pca(pats, seqs, rng, clustered=b in ("year", "newline", "prev")),
            "similar": nearest(i, near_payload),
        }
        (root / "heads" / f"{name}.json").write_text(json.dumps(payload_json))
        if not attribution_files and b in ("induction", "same", "year") and layer > 0 and examples:
            ex = examples[0]
            toks = seqs[ex["sequence"]][0]
            att = _attributions(name, layer, toks, pats[ex["sequence"]], rng)
            stem = f"{ex['sequence']}_{att['qk']['query']}_{att['qk']['key']}"
            (root / "attributions" / name).mkdir(parents=True, exist_ok=True)
            for kind in ("qk", "ov"):
                (root / "attributions" / name / f"{stem}_{kind}.json").write_text(
                    json.dumps(att[kind])
                )
                attribution_files.append(f"{name}/{stem}_{kind}.json")

    (root / "metrics.json").write_text(
        json.dumps({"columns": columns, "rows": rows, "docs": METRIC_DOCS})
    )
    try:
        import pandas as pd

        df = pd.DataFrame(rows, columns=columns)
        df.insert(2, "name", names)
        df.to_parquet(root / "metrics.parquet")
    except ImportError:
        pass
    (root / "vocab.json").write_text(json.dumps({str(i): tok for tok, i in ids.items()}))
    manifest = {
        "schema_version": 1,
        "status": "complete",
        "config": {"name": f"synthetic-{n_layers}x{n_heads}", "seed": seed, "synthetic": True},
        "model": {
            "name": "synthetic",
            "n_layers": n_layers,
            "n_heads": n_heads,
            "n_kv_heads": n_heads,
            "d_head": 64,
            "d_model": 64 * n_heads,
            "architecture": "synthetic",
            "source": "tests/browser/synthetic_run.py",
        },
        "dataset": {"path": "synthetic", "sha256": "0" * 64, "n_documents": len(CORPUS)},
        "tokens": {"sequences": n_sequences, "tokens": int(sum(len(t) for t, _ in seqs))},
        "timings": {"total_s": 0.0, "forward_s": 0.0},
        "metrics": METRIC_DOCS,
        "attributions": attribution_files,
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
