"""Reading a HeadVis data tree (docs/headvis-format.md) into what a run directory needs.

The models of :mod:`headscope.store.headvis_format` check each file; this module puts the files
together: which heads the tree has and where their files are, each head's metric values, its
sequences grouped into max-attention intervals (highest first, as a run stores its buckets), its
histogram and top tokens. Any problem is one ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from headscope.model.spec import head_name
from headscope.store.headvis_format import (
    HEAD_FILE_PATTERN,
    HeadFile,
    HeadId,
    Num,
    Scatter,
    ScatterRecord,
    Sequence,
    TreeConfig,
    load_file,
)

# statistics Neuronpedia writes per head that are not metrics of the head-selector scatter
_HEAD_STATISTICS = frozenset({"n_samples", "mean_max_activation"})
_NUMBER: TypeAdapter[float | None] = TypeAdapter(Num | None)
_HEAD_ID: TypeAdapter[tuple[int, int]] = TypeAdapter(HeadId)


def _number(value: Any, where: str) -> float | None:
    try:
        return _NUMBER.validate_python(value)
    except ValidationError as e:
        raise ValueError(f"{where}: {e.errors()[0]['msg']}, got {value!r}") from None


def _is_number(value: Any) -> bool:
    try:
        return _NUMBER.validate_python(value) is not None
    except ValidationError:
        return False


@dataclass
class Tree:
    """A tree's config and scatter, checked, and where each head's file is."""

    path: Path
    config: TreeConfig
    heads: list[tuple[int, int]]  # sorted by layer, then head
    n_layers: int
    n_heads: int
    metric_docs: dict[str, str]  # name -> description, in the tree's order
    scatter: dict[tuple[int, int], tuple[int, ScatterRecord]]  # head -> (index, record)
    files: dict[tuple[int, int], Path]

    @property
    def n_intervals(self) -> int | None:
        pipeline = self.config.pipeline_config or {}
        n = self.config.n_intervals or pipeline.get("n_intervals")
        return n if isinstance(n, int) and n >= 1 else None


@dataclass
class Head:
    """One head, ready for the run's payload."""

    statistics: dict[str, float]  # metric -> value (NaN where the tree has null)
    histogram: dict | None  # {"edges": [...], "counts": [...]}
    top_query_tokens: list[tuple[str, float, int]]  # (token, mass, count)
    top_key_tokens: list[tuple[str, float, int]]
    buckets: list[tuple[float, float, list[Sequence]]] = field(default_factory=list)
    mean_max_attention: float | None = None

    def strings(self):
        for _, _, seqs in self.buckets:
            for s in seqs:
                yield from s.tokens
        for t, _, _ in self.top_query_tokens + self.top_key_tokens:
            yield t


def digest(seq: Sequence) -> str:
    """Identifies a sequence by its tokens (to number sequences a tree leaves unnumbered)."""
    return hashlib.sha1(json.dumps(seq.tokens).encode()).hexdigest()


def _head_file(tree: Path, pattern: str, layer: int, head: int) -> Path:
    names = []
    for p in (pattern, HEAD_FILE_PATTERN, "{layer}_{head}.json"):
        try:
            name = p.format(layer=layer, head=head)
        except (KeyError, IndexError, ValueError):
            continue
        if name not in names:
            names.append(name)
        if (tree / "heads" / name).is_file():
            return tree / "heads" / name
    raise ValueError(
        f"{tree}: head {head_name(layer, head)} has no file "
        f"(looked for {' and '.join('heads/' + n for n in names)})"
    )


def read_tree(path: Path) -> Tree:
    """Check ``config.json`` and ``scatter_data.json`` and find every head's file."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: no config.json; this is not a HeadVis data tree")
    config = load_file(TreeConfig, cfg_path)
    info = config.headscope
    if info is not None and info.format_version > 1:
        raise ValueError(
            f"{cfg_path} at headscope.format_version: {info.format_version} is newer than this "
            "headscope reads (1)"
        )
    if config.format == "headvis" and (config.format_version or 1) > 1:
        raise ValueError(
            f"{cfg_path} at format_version: {config.format_version} is newer than this "
            "headscope reads (1)"
        )

    scatter: dict[tuple[int, int], tuple[int, ScatterRecord]] = {}
    if (path / "scatter_data.json").is_file():
        records = load_file(Scatter, path / "scatter_data.json").root
        scatter = {rec.layer_head: (i, rec) for i, rec in enumerate(records)}

    if config.heads is not None:
        heads = list(config.heads)
    elif scatter:
        heads = list(scatter)
    else:
        heads = []
        for p in sorted((path / "heads").glob("*.json")):
            try:
                heads.append(_HEAD_ID.validate_python(p.stem))
            except ValidationError:
                continue
    heads = sorted(set(heads))
    if not heads:
        raise ValueError(f"{cfg_path}: the tree lists no heads (no 'heads', scatter or files)")

    pipeline = config.pipeline_config or {}
    model = (info.model if info else None) or config.model or {}

    def shape(key: str, pipeline_key: str, default: int) -> int:
        for value, where in (
            (getattr(config, key), key),
            (pipeline.get(pipeline_key), f"pipeline_config.{pipeline_key}"),
            (model.get(key), f"model.{key}"),
        ):
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{cfg_path} at {where}: expected a positive integer")
                return value
        return default

    n_layers = shape("n_layers", "num_hidden_layers", heads[-1][0] + 1)
    n_heads = shape("n_heads", "num_attention_heads", max(h for _, h in heads) + 1)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"{cfg_path}: head {head_name(layer, head)} is outside "
                f"{n_layers} layers x {n_heads} heads"
            )
    files = {lh: _head_file(path, config.head_data_pattern, *lh) for lh in heads}

    if config.metrics is not None:
        docs = config.metric_descriptions
        metric_docs = {m.name: m.description or docs.get(m.name, "") for m in config.metrics}
    else:  # every numeric field of the scatter records (or of the heads' statistics), sorted
        found = {k for _, rec in scatter.values() for k, v in rec.values.items() if _is_number(v)}
        if not found:
            for p in files.values():
                stats = load_file(HeadFile, p).statistics
                found |= {k for k, v in stats.items() if _is_number(v)} - _HEAD_STATISTICS
        metric_docs = dict.fromkeys(sorted(found), "")
    return Tree(path, config, heads, n_layers, n_heads, metric_docs, scatter, files)


def _infer_bounds(n: int, seqs: list[Sequence]) -> list[tuple[float, float]]:
    """[lo, hi] of intervals 1..n from the sampled sequences alone.

    A tree that does not store its interval boundaries still sorts each sequence into the
    interval holding its max attention, so every value in a higher interval is at or above each
    boundary below it. The boundary under interval j is taken as the smallest max attention seen
    in intervals j and above: each interval then contains its sequences, and together they cover
    [0, 1] (an empty interval may have zero width).
    """
    lowest = [1.0] * (n + 2)  # lowest[j]: smallest max attention in intervals >= j
    for s in seqs:
        assert s.interval is not None
        lowest[s.interval] = min(lowest[s.interval], s.max_attention())
    for j in range(n - 1, 0, -1):
        lowest[j] = min(lowest[j], lowest[j + 1])
    cuts = [0.0, *lowest[2 : n + 1], 1.0]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _top_rows(rows, seqs: list[Sequence], totals: bool) -> list[tuple[str, float, int]]:
    """(token, mass, count). ``totals``: the tree's weights are totals over the sampled
    sequences and carry no count; the count becomes the token's occurrences in those sequences
    and the mass the total divided by it (a mean, as headscope's top tokens are)."""
    occurrences = Counter(t for s in seqs for t in s.tokens) if totals else Counter()
    out = []
    for r in rows:
        if r.count is not None or not totals:
            out.append((r.token, r.weight, r.count or 0))
        else:
            n = occurrences[r.token]
            out.append((r.token, r.weight / n if n else r.weight, n))
    return out


def read_head(tree: Tree, lh: tuple[int, int]) -> Head:
    """One head of ``tree``, checked (``lh`` is one of ``tree.heads``)."""
    path = tree.files[lh]
    d = load_file(HeadFile, path)
    name = head_name(*lh)
    for field_, expected in (("layer", lh[0]), ("head", lh[1])):
        if getattr(d, field_) not in (None, expected):
            raise ValueError(
                f"{path} at {field_}: says {getattr(d, field_)}, but the file is {name}"
            )

    statistics = {}
    index, record = tree.scatter.get(lh, (None, None))
    scatter_path = tree.path / "scatter_data.json"
    for metric in tree.metric_docs:
        if record is not None and metric in record.values:
            value = _number(record.values[metric], f"{scatter_path} at [{index}].{metric}")
        elif metric in d.statistics:
            value = _number(d.statistics[metric], f"{path} at statistics.{metric}")
        else:
            raise ValueError(f"{path}: no value for metric {metric!r} here or in scatter_data.json")
        statistics[metric] = math.nan if value is None else value
    mean_max = d.statistics.get("mean_max_activation")
    mean_max = _number(mean_max, f"{path} at statistics.mean_max_activation")

    if d.deciles is not None and not d.sequences:
        buckets = [(*dec.interval, dec.sequences) for dec in d.deciles]
        buckets.sort(key=lambda b: (-b[0], -b[1]))
        seqs = [s for _, _, ss in buckets for s in ss]
    else:
        seqs = d.sequences
        if d.interval_bounds is not None:
            bounds = list(d.interval_bounds)
        else:
            seen = max((s.interval or 1 for s in seqs), default=1)
            n = tree.n_intervals or seen
            if seen > n:
                i = next(i for i, s in enumerate(seqs) if (s.interval or 1) > n)
                raise ValueError(
                    f"{path} at sequences[{i}].interval: {seen} is above the tree's "
                    f"n_intervals ({n})"
                )
            bounds = _infer_bounds(n, seqs)
        by_interval: dict[int, list[Sequence]] = {i: [] for i in range(1, len(bounds) + 1)}
        for s in seqs:
            by_interval[s.interval or 1].append(s)
        buckets = [(*bounds[i - 1], by_interval[i]) for i in range(len(bounds), 0, -1)]
    histogram = None
    if d.histogram is not None:
        histogram = {"edges": d.histogram.bin_edges, "counts": d.histogram.bin_values}
    totals = d.deciles is None or bool(d.sequences)
    return Head(
        statistics,
        histogram,
        _top_rows(d.top_query_tokens, seqs, totals),
        _top_rows(d.top_key_tokens, seqs, totals),
        buckets,
        mean_max,
    )


def derive_maxima(n: int, sparse: list[list]) -> tuple[list[float], list[float]]:
    """max_as_query / max_as_key (docs/run-format.md) from the sparse pattern alone."""
    as_query, as_key = np.zeros(n), np.zeros(n)  # [T], [T]
    if sparse:
        qkw = np.asarray(sparse, dtype=np.float64)  # [N, 3]
        q, k, w = qkw[:, 0].astype(int), qkw[:, 1].astype(int), qkw[:, 2]
        off_sink = k >= 1
        np.maximum.at(as_query, q[off_sink], w[off_sink])
        later = q > k
        np.maximum.at(as_key, k[later], w[later])
    return as_query.tolist(), as_key.tolist()
