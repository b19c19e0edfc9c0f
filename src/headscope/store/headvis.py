"""HeadVis interchange: write a run as a HeadVis data tree, read such a tree back as a run.

The HeadVis data tree (docs/headvis-format.md) is the layout Neuronpedia's HeadVis pipeline
publishes and the HeadVis frontend reads: ``config.json``, ``scatter_data.json``,
``server_config.json``, ``attributions/manifest.json`` and one ``heads/L{l}H{h}.json`` per head,
with sampled sequences as token strings and flat sparse attention patterns. The export writes that
layout (plus a few fields the Neuronpedia readers ignore, so that nothing of the run is lost) and is
deterministic: sorted keys, every float rounded to 6 significant digits, so exporting a run,
importing the tree and exporting again gives the same bytes. The import reads Neuronpedia's trees,
headscope's and the older layout, and rejects a malformed tree with one ``ValueError`` naming the
file and the field. Either function builds its output in a temporary directory beside the target
and renames it into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headscope.files import atomic_dir, read_json, write_json, write_with
from headscope.model.spec import head_name
from headscope.store.headvis_format import (
    QK_DISTANCE_EDGES,
    HeadFile,
    HeadscopeInfo,
    MetricEntry,
    Sequence,
    TreeConfig,
    validate_file,
)
from headscope.store.headvis_parse import Head, derive_maxima, digest, read_head, read_tree
from headscope.store.run import open_run
from headscope.store.run_format import SCHEMA_VERSION

__all__ = ["export_headvis", "import_headvis"]

SIG_DIGITS = 6
# headscope computes patterns in its own registered attention function (model/capture.py)
ATTN_IMPLEMENTATION = "headscope"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------- shared helpers


def _canon(value: Any) -> Any:
    """A JSON-ready copy with sorted keys and every float at SIG_DIGITS significant digits.

    Rounding through the decimal text is idempotent, so re-exporting imported values is exact.
    NaN becomes null (as Neuronpedia writes a metric it could not compute).
    """
    if isinstance(value, dict):
        return {str(k): _canon(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        x = float(value)
        if math.isnan(x):
            return None
        if not math.isfinite(x):
            raise ValueError(f"cannot export the non-finite number {x}")
        return float(f"{x:.{SIG_DIGITS}g}")
    raise TypeError(f"cannot export a {type(value).__name__}")


def _is_tree(path: Path) -> bool:
    """An earlier export of ours (this layout or the older one)."""
    try:
        config = read_json(path / "config.json")
        return isinstance(config.get("headscope"), dict) or config.get("format") == "headvis"
    except (OSError, ValueError, AttributeError):
        return False


def _is_imported_run(path: Path) -> bool:
    try:
        return "imported_from" in read_json(path / "manifest.json").get("config", {})
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(target: Path, replaceable: Callable[[Path], bool], what: str) -> None:
    """Refuse to overwrite anything but an empty directory or an earlier output of ours."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if any(target.iterdir()) and not replaceable(target):
        raise FileExistsError(f"{target} exists and is not a {what}; choose another path")


# ----------------------------------------------------------------------------------- export


def _read_vocab(path: Path) -> dict[int, str]:
    raw = read_json(path)
    if isinstance(raw, list):
        return dict(enumerate(raw))
    return {int(k): v for k, v in raw.items()}


def _qk_distance_histogram(seqs: list[Sequence]) -> dict:
    """Attention mass by query-key distance over the sequences' sparse entries, in log-spaced
    bins (extended by doublings when a sequence is longer than the standard bins reach)."""
    triples = [t for s in seqs for t in s.triples()]
    qkw = np.asarray(triples, dtype=np.float64).reshape(-1, 3)  # [N, 3]
    dist, w = qkw[:, 0] - qkw[:, 1], qkw[:, 2]  # [N], [N]
    edges = list(QK_DISTANCE_EDGES)
    while len(dist) and edges[-1] <= dist.max():
        edges.append(edges[-1] * 2)
    bins = np.searchsorted(edges, dist, side="right") - 1
    values = np.bincount(bins, weights=w, minlength=len(edges) - 1)
    return {"bin_edges": edges, "bin_values": values.tolist()}


def _export_head(payload: dict, vocab: dict[int, str], where: Path) -> dict:
    """A run's head payload as a HeadVis head file (checked against the format)."""
    buckets = payload.get("buckets", [])  # highest first
    examples = payload.get("examples", [])
    n = len(buckets)
    sequences = []
    for b in reversed(range(n)):
        for i in buckets[b]["examples"]:
            ex = examples[i]
            try:
                tokens = [vocab[t] for t in ex["tokens"]]
            except KeyError as e:
                raise ValueError(f"{where}: token id {e.args[0]} is not in vocab.json") from None
            sparse = sorted((int(q), int(k), w) for q, k, w in ex.get("sparse", []))
            sequences.append(
                {
                    "sequence_id": ex["sequence"],
                    "interval": n - b,
                    "tokens": tokens,
                    "seq_len": len(tokens),
                    "attention_indices": [q * len(tokens) + k for q, k, _ in sparse],
                    "attention_values": [w for _, _, w in sparse],
                    "max_activation": ex["max_attention"],
                    "doc_starts": ex.get("doc_starts", []),
                }
            )
    raw: dict[str, Any] = {
        "sequences": sequences,
        "interval_bounds": [[b["lo"], b["hi"]] for b in reversed(buckets)],
        "top_query_tokens": [
            {"token": r["token"], "weight": r["mass"], "count": r["count"]}
            for r in payload.get("top_query_tokens", [])
        ],
        "top_key_tokens": [
            {"token": r["token"], "weight": r["mass"], "count": r["count"]}
            for r in payload.get("top_key_tokens", [])
        ],
        "statistics": {
            "n_samples": len(sequences),
            "mean_max_activation": payload.get("mean_max_attention"),
        },
    }
    if "histogram" in payload:
        hist = payload["histogram"]
        raw["histogram"] = {"bin_edges": hist["edges"], "bin_values": hist["counts"]}
    head = validate_file(HeadFile, _canon(raw), where)
    out = head.dump()
    out["qk_distance_histogram"] = _qk_distance_histogram(head.sequences)
    return _canon(out)


def _model_name(model: dict) -> str:
    """The Hugging Face id for a hub model (as Neuronpedia names models), else headscope's name."""
    source = str(model.get("source", ""))
    return (
        source.removeprefix("hub:") if source.startswith("hub:") else model.get("name", "unknown")
    )


def _pipeline_config(manifest: dict, seen: dict[str, Any]) -> dict[str, Any]:
    """How the data was made, under the names Neuronpedia's readers look for.

    A run imported from a tree keeps that tree's; a headscope run's comes from its precompute
    settings, and ``seen`` (what the exported heads hold) fills in what a run does not record.
    """
    made_by = manifest.get("config", {})
    if isinstance(made_by.get("pipeline_config"), dict):
        return dict(made_by["pipeline_config"])
    p = (made_by.get("precompute") if "imported_from" in made_by else made_by) or {}
    model, dataset = manifest.get("model", {}), manifest.get("dataset", {})
    processed = manifest.get("tokens", {}).get("sequences", p.get("sequences"))
    out = {
        "model_name": _model_name(model),
        "dataset_name": dataset.get("name") or dataset.get("path") or "unknown",
        "n_sequences": p.get("sequences") or processed or seen["n_sequences"],
        "actual_sequences_processed": processed or seen["n_sequences"],
        "seq_len": p.get("seq_len") or seen["seq_len"],
        "dtype": _DTYPES.get(str(p.get("dtype")), str(p.get("dtype") or "unknown")),
        "attn_implementation": ATTN_IMPLEMENTATION,
        "samples_per_top_interval": p.get("top_k"),
        "samples_per_interval": p.get("per_bucket"),
        "sparse_topk_per_row": p.get("sparse_top_k"),
        "sparse_threshold": p.get("sparse_threshold"),
        "sample_seed": p.get("seed"),
        "batch_size": p.get("batch_size"),
        "device": p.get("device"),
    }
    return {k: v for k, v in out.items() if v is not None}


def export_headvis(run_dir: Path | str, out: Path | str) -> Path:
    """Write the complete run ``run_dir`` as a HeadVis data tree at ``out``; return ``out``.

    ``out`` must not exist, be empty, or hold an earlier HeadVis export (which is replaced).
    The output is byte-identical for the same run. Raises ``RunError`` (a ``ValueError``) for a
    missing or incomplete run.
    """
    run = open_run(run_dir)
    out = Path(out)
    _check_target(out, _is_tree, "HeadVis tree")
    vocab = _read_vocab(run.path / "vocab.json")
    table = run.metrics.sort_values(["layer", "head"], kind="stable")
    names = [c for c in table.columns if c not in ("layer", "head", "name")]
    records = [
        {"layer": int(row["layer"]), "head": int(row["head"]), **{n: row[n] for n in names}}
        for row in table.to_dict("records")
    ]
    heads = [(r["layer"], r["head"]) for r in records]
    manifest = run.manifest
    model = dict(manifest.get("model", {}))
    n_layers = int(model.get("n_layers", max((lh[0] for lh in heads), default=-1) + 1))
    n_heads = int(model.get("n_heads", max((lh[1] for lh in heads), default=-1) + 1))
    model.update(n_layers=n_layers, n_heads=n_heads)
    made_by = manifest.get("config", {})

    with atomic_dir(out) as tmp:
        n_intervals, seq_len, sequence_ids = 1, 0, set()
        for lh in heads:
            name = head_name(*lh)
            doc = _export_head(run.head(name), vocab, run.path / "heads" / f"{name}.json")
            n_intervals = max(n_intervals, len(doc["interval_bounds"]))
            for s in doc["sequences"]:
                seq_len = max(seq_len, s["seq_len"])
                sequence_ids.add(s["sequence_id"])
            write_json(tmp / "heads" / f"{name}.json", doc)
        seen = {"n_sequences": len(sequence_ids), "seq_len": seq_len}
        pipeline = _pipeline_config(manifest, seen)
        pipeline.setdefault("n_intervals", n_intervals)
        pipeline.setdefault("num_hidden_layers", n_layers)
        pipeline.setdefault("num_attention_heads", n_heads)
        pipeline.setdefault("attention_layer_indices", sorted({layer for layer, _ in heads}))
        precompute = made_by.get("precompute") if "imported_from" in made_by else made_by
        info = HeadscopeInfo(
            model=model,
            dataset=manifest.get("dataset", {}),
            tokens=manifest.get("tokens"),
            precompute=precompute or None,
        )
        config = TreeConfig(
            model_name=str(pipeline.get("model_name", "unknown")),
            np_model_id=pipeline.get("np_model_id"),
            dataset_name=str(pipeline.get("dataset_name", "unknown")),
            heads=heads,
            n_layers=n_layers,
            n_heads=n_heads,
            n_intervals=n_intervals,
            metrics=[MetricEntry(name=n) for n in names],
            metric_descriptions={n: run.metric_docs.get(n, "") for n in names},
            pipeline_config=pipeline,
            headscope=info,
        )
        write_json(tmp / "config.json", _canon(config.dump()), indent=2)
        write_json(tmp / "scatter_data.json", _canon(records))
        write_json(tmp / "server_config.json", {})
        write_json(tmp / "attributions" / "manifest.json", {})
    return out


# ----------------------------------------------------------------------------------- import


def _payload(lh: tuple[int, int], h: Head, ids: dict[str, int], number) -> dict[str, Any]:
    """The run's head payload (docs/run-format.md) of an imported head."""
    examples: list[dict] = []
    buckets: list[dict] = []
    for lo, hi, seqs in h.buckets:
        idx = []
        for s in seqs:
            sparse = s.triples()
            as_query, as_key = derive_maxima(len(s.tokens), sparse)
            idx.append(len(examples))
            examples.append(
                {
                    "sequence": number(s),
                    "max_attention": s.max_attention(),
                    "tokens": [ids[t] for t in s.tokens],
                    "doc_starts": s.doc_starts or [],
                    "max_as_query": as_query,
                    "max_as_key": as_key,
                    "sparse": sparse,
                }
            )
        buckets.append({"lo": lo, "hi": hi, "examples": idx})

    def rows(tokens: list[tuple[str, float, int]]) -> list[dict]:
        return [{"token": t, "id": ids[t], "mass": m, "count": c} for t, m, c in tokens]

    payload: dict[str, Any] = {
        "head": head_name(*lh),
        "layer": lh[0],
        "index": lh[1],
        "metrics": h.statistics,
        "curves": {},
        "buckets": buckets,
        "examples": examples,
        "top_query_tokens": rows(h.top_query_tokens),
        "top_key_tokens": rows(h.top_key_tokens),
        "pca": {},
        "similar": [],
    }
    if h.histogram is not None:
        payload["histogram"] = h.histogram
    if h.mean_max_attention is not None:
        payload["mean_max_attention"] = h.mean_max_attention
    return payload


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def import_headvis(tree: Path | str, run_dir: Path | str) -> Path:
    """Read the HeadVis data tree ``tree`` into a new run directory ``run_dir``; return it.

    Reads the trees Neuronpedia publishes and the ones headscope exports, and stays tolerant of
    the older layout (see docs/headvis-format.md). Token strings get ids in sorted order. What
    HeadVis does not carry (PCA, similar heads, curves, motif maps) is left empty. ``run_dir``
    must not exist, be empty, or hold an earlier import (which is replaced). Raises
    ``ValueError`` naming the file and the field for a malformed tree, and then writes nothing.
    """
    tree, run_dir = Path(tree), Path(run_dir)
    if not (tree / "config.json").is_file():
        raise ValueError(f"{tree}: no config.json; this is not a HeadVis data tree")
    _check_target(run_dir, _is_imported_run, "run imported from HeadVis")
    t = read_tree(tree)
    metric_names = list(t.metric_docs)

    # pass 1: check every head and collect the token strings and unnumbered sequences
    strings: set[str] = set()
    unnumbered: dict[str, int] = {}
    top_index = -1
    metric_rows = []
    for lh in t.heads:
        h = read_head(t, lh)
        strings.update(h.strings())
        for _, _, seqs in h.buckets:
            for s in seqs:
                if s.sequence_id is None:
                    unnumbered.setdefault(digest(s), len(unnumbered))
                else:
                    top_index = max(top_index, s.sequence_id)
        metric_rows.append([*lh, *(h.statistics[n] for n in metric_names)])
    ids = {s: i for i, s in enumerate(sorted(strings))}

    def number(s: Sequence) -> int:
        if s.sequence_id is not None:
            return s.sequence_id
        return top_index + 1 + unnumbered[digest(s)]

    cfg = t.config
    info = cfg.headscope or HeadscopeInfo(
        model=cfg.model or ({"name": cfg.model_name} if cfg.model_name else {}),
        dataset=cfg.dataset or ({"name": cfg.dataset_name} if cfg.dataset_name else {}),
        tokens=cfg.tokens,
        precompute=cfg.precompute,
    )
    made_by: dict[str, Any] = {"imported_from": str(tree)}
    if info.precompute:
        made_by["precompute"] = info.precompute
    if cfg.pipeline_config is not None:
        made_by["pipeline_config"] = cfg.pipeline_config
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "config": made_by,
        "model": {**info.model, "n_layers": t.n_layers, "n_heads": t.n_heads},
        "dataset": info.dataset,
        "layers": sorted({layer for layer, _ in t.heads}),
        "metrics": t.metric_docs,
    }
    if info.tokens:
        manifest["tokens"] = info.tokens

    with atomic_dir(run_dir) as tmp:
        # pass 2: read again (already checked) and write one head at a time
        for lh in t.heads:
            payload = _payload(lh, read_head(t, lh), ids, number)
            write_json(tmp / "heads" / f"{head_name(*lh)}.json", _json_safe(payload))

        df = pd.DataFrame(metric_rows, columns=["layer", "head", *metric_names])
        df = df.astype(
            {"layer": "int64", "head": "int64", **dict.fromkeys(metric_names, "float64")}
        )
        df.insert(2, "name", [head_name(layer, head) for layer, head in t.heads])
        write_with(tmp / "metrics.parquet", lambda p: df.to_parquet(p, index=False))
        write_json(
            tmp / "metrics.json",
            _json_safe(
                {
                    "columns": ["layer", "head", *metric_names],
                    "rows": metric_rows,
                    "docs": t.metric_docs,
                }
            ),
        )
        write_json(tmp / "vocab.json", {str(i): s for s, i in ids.items()})
        write_json(tmp / "manifest.json", manifest, indent=2)
    return run_dir
