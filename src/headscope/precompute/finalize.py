"""Turn a merged stream state into the run directory (docs/run-format.md)."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import orjson
import pandas as pd
import torch

from headscope.files import write_bytes, write_json, write_npy, write_with
from headscope.metrics.registry import METRICS, metric_docs
from headscope.model import ModelAdapter
from headscope.model.spec import head_name
from headscope.precompute import probes
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.motifs import MotifEmbedder, head_distances, head_map, nearest_heads
from headscope.precompute.probe_cache import probe_metrics
from headscope.precompute.state import StreamState
from headscope.progress import bar, counting_tokens
from headscope.store.run_format import SCHEMA_VERSION

N_SIMILAR = 10
_WRITERS = 4  # threads writing (and fsyncing) head files while the next ones are built


def _metric_table(
    adapter: ModelAdapter, cfg: PrecomputeConfig, state: StreamState, layers: list[int]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All per-head metrics [L, H] by name (streaming, then probe and weight metrics, each in
    registration order), plus the long-prefix curves [L, H, 4]."""
    table = {name: value.float() for name, value in state.metrics.result().items()}
    probe = probes.Probe(adapter, layers, cfg.probe_sequences, cfg.probe_length, cfg.seed)
    model_metrics, curve = probe_metrics(probe)  # from the cache when this model ran them
    table.update(model_metrics)
    return table, curve


def _similar(
    state: StreamState, layers: list[int], n_heads: int, out: Path
) -> dict[str, list[dict]]:
    """Motif embedding, head distances, 2-D maps and nearest heads; writes motifs/."""
    feats = state.motifs.seen(layers)  # [L', H, M, F]
    if feats is None:
        return {}
    Lp, H, M, F = feats.shape
    embedder = MotifEmbedder.fit(feats.reshape(-1, F))
    emb = embedder.embed(feats.reshape(-1, F)).reshape(Lp * H, M, -1)  # [N, M, 16]
    (out / "motifs").mkdir(exist_ok=True)
    embedder.save(out / "motifs" / "pca.safetensors")
    write_npy(out / "motifs" / "embedding.npy", emb.numpy().astype("float32"))
    # the raw features too: another run's (or model's) motif space can embed them
    write_npy(
        out / "motifs" / "features.npy", feats.reshape(Lp * H, M, F).numpy().astype("float32")
    )
    dist = head_distances(emb)  # [N, N]
    names = [head_name(layer, h) for layer in layers for h in range(n_heads)]
    maps = head_map(dist)
    k = min(N_SIMILAR, len(names) - 1)
    idx, d = (
        nearest_heads(dist, k)
        if k > 0
        else (torch.zeros(len(names), 0, dtype=torch.long), torch.zeros(len(names), 0))
    )
    similar = {
        names[i]: [
            {"head": names[j], "distance": round(float(dd), 5)}
            for j, dd in zip(idx[i].tolist(), d[i].tolist(), strict=True)
        ]
        for i in range(len(names))
    }
    write_json(
        out / "motifs" / "map.json",
        {
            "heads": names,
            **{k_: v.tolist() if hasattr(v, "tolist") else v for k_, v in maps.items()},
            "nearest": {n: [s["head"] for s in v] for n, v in similar.items()},
        },
    )
    return similar


def _defined(value: torch.Tensor | float) -> float | None:
    """A metric's value, or None (null in JSON, missing in Parquet) where it is undefined: a mean
    over no eligible (query, key) pair, e.g. induction on data without a repeated token."""
    v = float(value)
    return v if math.isfinite(v) else None


def head_file_bytes(payload: dict) -> bytes:
    """A head file's JSON: compact UTF-8, as :func:`~headscope.files.write_json` writes it, by
    orjson (a tenth of the standard encoder's time: ~12 million numbers at 64 sequences).
    Floats print their shortest round-trip form as before, only small ones differently (1e-05
    as 0.00001, 2.5e-07 as 2.5e-7: the same values). A non-finite float becomes null, as in the
    server's responses; the head file schema has no null where a number is measured, so reading
    the run rejects it.
    """
    return orjson.dumps(payload)


def _round4(x: float) -> float:
    """A float to 4 significant digits (PCA coordinates need no more; keeps payloads small)."""
    return float(f"{x:.4g}")


def _round_pca(fit: dict) -> dict:
    """A head's entry of :meth:`PairCollector.fit` with its floats (coordinates, variance
    ratios, each point's norm) to 4 significant digits; a new dict, the points' token lists
    shared with ``fit``. Walks only the fields that hold floats: a generic walk spent most of
    its time on the context spans' token ids."""
    out: dict = {}
    for name, value in fit.items():
        if name == "points":
            out[name] = [{**point, "norm": _round4(point["norm"])} for point in value]
        else:
            out[name] = {
                "coords": [[_round4(x) for x in row] for row in value["coords"]],
                "variance_ratio": [_round4(x) for x in value["variance_ratio"]],
            }
    return out


def _probe_tokens(cfg: PrecomputeConfig) -> int:
    """Tokens the probes' forward passes read (for the progress bar): prefix matching on
    sequences of 2L + 1 tokens, then the long-prefix pass: four probes on sequences cut after
    their last query, L + 6 tokens."""
    n, length = cfg.probe_sequences, cfg.probe_length
    return n * (2 * length + 1) + 4 * n * (length + 6)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while millions of small acyclic lists and dicts
    (PCA points, example payloads) are built: each of its passes walks every live object, which
    made building the head files about twice as slow. Reference counting still frees them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``phases[name]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - t0, 3)


def finalize(
    adapter: ModelAdapter,
    cfg: PrecomputeConfig,
    state: StreamState,
    out: Path,
    *,
    layers: list[int],
    dataset: dict,
    timings: dict,
    progress: bool = False,
) -> None:
    """Write the run directory; ``progress``: bars on stderr for steps that take a while."""
    s = adapter.spec
    toks = adapter.tokens
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    probe_bar = bar(_probe_tokens(cfg), "finalize: probes", "tok", enabled=progress)
    with _phase(phases, "probes"), probe_bar, counting_tokens(adapter, probe_bar):
        table, curve = _metric_table(adapter, cfg, state, layers)
    with _phase(phases, "metrics_files"):
        names = list(table)
        rows = []
        for layer in layers:
            for h in range(s.n_heads):
                rows.append([layer, h, *[_defined(table[n][layer, h]) for n in names]])
        df = pd.DataFrame(rows, columns=["layer", "head", *names]).astype({n: float for n in names})
        df.insert(2, "name", [head_name(layer, h) for layer in layers for h in range(s.n_heads)])
        write_with(out / "metrics.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        docs = {n: METRICS[n].doc if n in METRICS else "" for n in names}
        write_json(
            out / "metrics.json", {"columns": ["layer", "head", *names], "rows": rows, "docs": docs}
        )

    with _cyclic_gc_paused():
        steps = bar(3, "finalize: motifs, PCA, top tokens", "step", enabled=progress)
        with _phase(phases, "motifs"):
            similar = _similar(state, layers, s.n_heads, out)
        steps.update()
        with _phase(phases, "pca"):
            pca = state.pairs.fit(n_components=3)
        steps.update()
        with _phase(phases, "top_tokens"):
            top = state.top_tokens.top_tokens(min_count=3, k=20)
        steps.update()
        steps.close()
        with _phase(phases, "head_files"):
            heads_bar = bar(len(layers) * s.n_heads, "finalize: heads", "head", enabled=progress)
            selected = state.examples.selector.selected()
            hist = state.examples.selector.histograms()
            edges = [round(i / hist.shape[-1], 4) for i in range(hist.shape[-1] + 1)]
            vocab_ids: set[int] = set()
            # tokens and document starts of each example sequence, as lists once (heads share them)
            sequences: dict[int, tuple[list[int], list[int]]] = {}
            for seq, (ids, starts) in state.examples.payloads.sequences.items():
                # first tokens of documents (position 0 is the BOS sink, not a document)
                sequences[seq] = (ids.tolist(), (starts[1:].nonzero().flatten() + 1).tolist())
                vocab_ids.update(sequences[seq][0])
            # Encoded here, written and fsynced by the pool: JSON encoding holds the GIL, so
            # threads encoding beside this one would only stall its every torch/NumPy call.
            writer = ThreadPoolExecutor(_WRITERS)
            written: list[Future] = []
            try:
                for layer in layers:
                    for h in range(s.n_heads):
                        examples: list[dict] = []
                        buckets: list[dict] = []
                        for lo, hi, items in selected[(layer, h)]:
                            idx = []
                            for seq, score in items:
                                idx.append(len(examples))
                                examples.append(
                                    {
                                        "sequence": seq,
                                        "max_attention": round(score, 4),
                                        "tokens": sequences[seq][0],
                                        "doc_starts": sequences[seq][1],
                                        **state.examples.payloads.example(layer, h, seq),
                                    }
                                )
                            buckets.append({"lo": lo, "hi": hi, "examples": idx})
                        tt = top[(layer, h)]

                        def tok_rows(rows_):
                            return [
                                {"token": toks.display(t), "id": t, "mass": round(m, 5), "count": c}
                                for t, m, c in rows_
                            ]

                        p = _round_pca(pca[(layer, h)])
                        for point in p.get("points", []):
                            point["query"] = toks.display(point.pop("query_token"))
                            point["key"] = toks.display(point.pop("key_token"))
                            for span in point["context"]:
                                vocab_ids.update(span["tokens"])
                        name = head_name(layer, h)
                        (out / "heads").mkdir(exist_ok=True)
                        payload = {
                            "head": name,
                            "layer": layer,
                            "index": h,
                            "metrics": {n: _defined(table[n][layer, h]) for n in names},
                            "curves": {
                                "long_prefix_induction": [
                                    round(float(x), 5) for x in curve[layer, h]
                                ]
                            },
                            "histogram": {"edges": edges, "counts": hist[layer, h].tolist()},
                            "buckets": buckets,
                            "examples": examples,
                            "top_query_tokens": tok_rows(tt["query"]),
                            "top_key_tokens": tok_rows(tt["key"]),
                            "pca": p,
                            "similar": similar.get(name, []),
                        }
                        written.append(
                            writer.submit(
                                write_bytes,
                                out / "heads" / f"{name}.json",
                                head_file_bytes(payload),
                            )
                        )
                        written[-1].add_done_callback(lambda _: heads_bar.update())
            finally:
                writer.shutdown(wait=True)  # also when building a head failed
            for done in written:
                done.result()  # a failed write raises here
            heads_bar.close()
    write_json(out / "vocab.json", {str(i): toks.display(i) for i in sorted(vocab_ids)})
    info = adapter.info()
    write_json(
        out / "manifest.json",
        {
            "schema_version": SCHEMA_VERSION,
            "status": "complete",
            "config": cfg.to_dict(),
            "model": {
                k: info[k]
                for k in (
                    "name",
                    "source",
                    "architecture",
                    "n_layers",
                    "n_heads",
                    "n_kv_heads",
                    "d_head",
                    "d_model",
                    "d_vocab",
                    "bos_token",
                )
            },
            "dataset": dataset,
            "tokens": {"sequences": state.sequences_done, "tokens": state.tokens_done},
            "layers": layers,
            "timings": {
                **timings,
                "finalize_s": round(time.perf_counter() - t0, 3),
                **{f"{name}_s": seconds for name, seconds in phases.items()},
                "total_s": round(timings["total_s"] + time.perf_counter() - t0, 3),
            },
            "metrics": {**docs, **{n: METRICS[n].doc for n in metric_docs() if n not in docs}},
        },
        indent=2,
    )
