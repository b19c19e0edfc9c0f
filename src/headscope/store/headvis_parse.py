"""Reading a HeadVis data tree tolerantly (see docs/headvis-format.md): every value is checked
and located (``file at deciles[1].sequences[0]...``) so a malformed tree fails with a message that
names the file and the place; the variations a published tree may have are accepted."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headscope.model.spec import head_name
from headscope.store.files import read_json

# keys of a scatter record that name the head rather than measure it
_SCATTER_ID_KEYS = frozenset({"layer", "head", "id", "name", "head_id", "label"})

# ----------------------------------------------------------------------------------- import


class _Where:
    """A file and a path inside it, for error messages: ``heads/L0H1.json: deciles[2]...``."""

    def __init__(self, file: Path, inner: str = ""):
        self.file, self.inner = file, inner

    def __truediv__(self, part: str | int) -> _Where:
        step = f"[{part}]" if isinstance(part, int) else (f".{part}" if self.inner else part)
        return _Where(self.file, self.inner + step)

    def error(self, problem: str) -> ValueError:
        at = f" at {self.inner}" if self.inner else ""
        return ValueError(f"{self.file}{at}: {problem}")


def _load(path: Path) -> Any:
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _int(value: Any, where: _Where) -> int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise where.error(f"expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(f"expected an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise where.error(f"expected an integer, got {value!r}")
    return int(value)


def _float(value: Any, where: _Where) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise where.error(f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise where.error(f"expected a finite number, got {value!r}")
    return float(value)


def _list(value: Any, where: _Where) -> list:
    if not isinstance(value, list):
        raise where.error(f"expected a list, got {type(value).__name__}")
    return value


def _dict(value: Any, where: _Where) -> dict:
    if not isinstance(value, dict):
        raise where.error(f"expected an object, got {type(value).__name__}")
    return value


def _first(d: dict, *keys: str, default: Any = None) -> tuple[str | None, Any]:
    """The first of ``keys`` present in ``d`` (published trees differ in field names)."""
    for k in keys:
        if k in d:
            return k, d[k]
    return None, default


_HEAD_ID = (re.compile(r"L(\d+)H(\d+)"), re.compile(r"(\d+)[_.](\d+)"))


def _head_id(value: Any, where: _Where) -> tuple[int, int]:
    """``"L5H3"``, ``"5_3"``, ``"5.3"``, ``[5, 3]`` or ``{"layer": 5, "head": 3}`` -> (5, 3)."""
    if isinstance(value, str):
        for pattern in _HEAD_ID:
            m = pattern.fullmatch(value.strip())
            if m:
                return int(m.group(1)), int(m.group(2))
    elif isinstance(value, list) and len(value) == 2:
        return _int(value[0], where / 0), _int(value[1], where / 1)
    elif isinstance(value, dict) and "layer" in value and "head" in value:
        return _int(value["layer"], where / "layer"), _int(value["head"], where / "head")
    raise where.error(f"cannot read a head id from {value!r}; expected e.g. 'L5H3' or '5_3'")


@dataclass
class _Sequence:
    index: int | None
    tokens: list[str]
    max_attention: float
    doc_starts: list[int]
    sparse: list[list]  # [[q, k, w], ...]

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.tokens).encode()).hexdigest()


@dataclass
class _Head:
    layer: int
    head: int
    statistics: dict[str, float]
    histogram: dict | None
    top_query_tokens: list[tuple[str, float, int]]
    top_key_tokens: list[tuple[str, float, int]]
    deciles: list[tuple[float, float, list[_Sequence]]] = field(default_factory=list)

    def strings(self) -> Iterator[str]:
        for _, _, seqs in self.deciles:
            for s in seqs:
                yield from s.tokens
        for t, _, _ in self.top_query_tokens + self.top_key_tokens:
            yield t


def _parse_sparse(value: Any, n_tokens: int, where: _Where) -> list[list]:
    out = []
    for i, entry in enumerate(_list(value, where)):
        w = where / i
        if isinstance(entry, dict):
            _, q = _first(entry, "query", "q")
            _, k = _first(entry, "key", "k")
            _, wt = _first(entry, "weight", "w", "value")
            entry = [q, k, wt]
        if not isinstance(entry, list) or len(entry) != 3:
            raise w.error(f"expected a [query, key, weight] triple, got {entry!r}")
        q, k, wt = _int(entry[0], w / 0), _int(entry[1], w / 1), _float(entry[2], w / 2)
        if not 0 <= q < n_tokens:
            raise w.error(f"query position {q} is outside the sequence's {n_tokens} tokens")
        if not 0 <= k < n_tokens:
            raise w.error(f"key position {k} is outside the sequence's {n_tokens} tokens")
        if k > q:
            raise w.error(f"key position {k} comes after query position {q} (causal attention)")
        if not 0.0 <= wt <= 1.0:
            raise w.error(f"attention weight {wt} is outside [0, 1]")
        out.append([q, k, wt])
    return out


def _parse_sequence(value: Any, where: _Where) -> _Sequence:
    d = _dict(value, where)
    key, tokens = _first(d, "tokens", "token_strings")
    if key is None:
        raise where.error("a sequence needs 'tokens' (a list of token strings)")
    tokens = _list(tokens, where / key)
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise (where / key / i).error(f"expected a token string, got {t!r}")
    key, raw = _first(d, "sparse_attention", "sparse", "attention", "sparse_pattern", "pattern")
    sparse = _parse_sparse(raw, len(tokens), where / key) if key else []
    key, raw = _first(d, "max_attention", "max_act", "max_value")
    if key is not None:
        max_attention = _float(raw, where / key)
        if not 0.0 <= max_attention <= 1.0:
            raise (where / key).error(f"max attention {max_attention} is outside [0, 1]")
    else:  # as the run defines it: queries >= 1, keys 1..q
        max_attention = max((w for q, k, w in sparse if q >= 1 and k >= 1), default=0.0)
    key, raw = _first(d, "sequence_index", "index", "seq_idx")
    index = _int(raw, where / key) if key else None
    starts: list[int] = []
    if "doc_starts" in d:
        raw_starts = _list(d["doc_starts"], where / "doc_starts")
        starts = [_int(s, where / "doc_starts" / i) for i, s in enumerate(raw_starts)]
        for i, s in enumerate(starts):
            if not 0 <= s < max(1, len(tokens)):
                raise (where / "doc_starts" / i).error(f"position {s} is outside the sequence")
    return _Sequence(index, tokens, max_attention, starts, sparse)


def _parse_interval(d: dict, where: _Where) -> tuple[float, float]:
    key, raw = _first(d, "interval", "range", "bounds")
    if key is not None:
        pair = _list(raw, where / key)
        if len(pair) != 2:
            raise (where / key).error(f"expected [lo, hi], got {pair!r}")
        lo, hi = _float(pair[0], where / key / 0), _float(pair[1], where / key / 1)
    else:
        klo, lo_raw = _first(d, "lo", "min", "low")
        khi, hi_raw = _first(d, "hi", "max", "high")
        if klo is None or khi is None:
            raise where.error("a decile needs 'interval': [lo, hi]")
        lo, hi = _float(lo_raw, where / klo), _float(hi_raw, where / khi)
    if not 0.0 <= lo <= hi <= 1.0:
        raise where.error(f"decile interval [{lo}, {hi}] is not inside [0, 1] with lo <= hi")
    return lo, hi


def _parse_tokens(value: Any, where: _Where) -> list[tuple[str, float, int]]:
    out = []
    for i, row in enumerate(_list(value, where)):
        w = where / i
        row = _dict(row, w)
        if not isinstance(row.get("token"), str):
            raise w.error("a top-token row needs 'token' (a string)")
        key, mass = _first(row, "mass", "mean_attention", "mean_mass", "attention", default=0.0)
        count = _int(row.get("count", 0), w / "count")
        out.append((row["token"], _float(mass, w / key if key else w), count))
    return out


def _parse_histogram(value: Any, where: _Where) -> dict:
    d = _dict(value, where)
    key, edges = _first(d, "bin_edges", "edges", "bins")
    if key is None or "counts" not in d:
        raise where.error("a histogram needs 'bin_edges' and 'counts'")
    edges = [_float(e, where / key / i) for i, e in enumerate(_list(edges, where / key))]
    counts = _list(d["counts"], where / "counts")
    counts = [_int(c, where / "counts" / i) for i, c in enumerate(counts)]
    if len(counts) != len(edges) - 1:
        raise where.error(f"{len(edges)} bin edges need {len(edges) - 1} counts, not {len(counts)}")
    if any(b < a for a, b in zip(edges, edges[1:], strict=False)):
        raise where.error("bin edges must be increasing")
    return {"edges": edges, "counts": counts}


def _parse_head(
    path: Path,
    layer: int,
    head: int,
    metric_names: list[str],
    scatter: tuple[dict, _Where] | None,
) -> _Head:
    where = _Where(path)
    d = _dict(_load(path), where)
    for field_, expected in (("layer", layer), ("head", head)):
        if field_ in d and _int(d[field_], where / field_) != expected:
            raise (where / field_).error(
                f"says {d[field_]!r}, but the file is {head_name(layer, head)}"
            )
    stats_key, stats_raw = _first(d, "statistics", "stats", "metrics", default={})
    stats_where = where / (stats_key or "statistics")
    stats_raw = _dict(stats_raw, stats_where)
    record, record_where = scatter if scatter is not None else ({}, where)
    statistics = {}
    for name in metric_names:
        if name in record:
            statistics[name] = _float(record[name], record_where / name)
        elif name in stats_raw:
            statistics[name] = _float(stats_raw[name], stats_where / name)
        else:
            raise where.error(f"no value for metric {name!r} here or in scatter_data.json")
    histogram = _parse_histogram(d["histogram"], where / "histogram") if "histogram" in d else None
    deciles = []
    for i, dec in enumerate(_list(d.get("deciles", []), where / "deciles")):
        w = where / "deciles" / i
        dec = _dict(dec, w)
        lo, hi = _parse_interval(dec, w)
        seq_key, seqs = _first(dec, "sequences", "examples", default=[])
        sw = w / (seq_key or "sequences")
        seqs = [_parse_sequence(s, sw / j) for j, s in enumerate(_list(seqs, sw))]
        deciles.append((lo, hi, seqs))
    deciles.sort(key=lambda x: (-x[0], -x[1]))  # highest first, as the run stores buckets
    return _Head(
        layer,
        head,
        statistics,
        histogram,
        _parse_tokens(d.get("top_query_tokens", []), where / "top_query_tokens"),
        _parse_tokens(d.get("top_key_tokens", []), where / "top_key_tokens"),
        deciles,
    )


def _parse_metric_list(value: Any, where: _Where) -> dict[str, str] | None:
    """config.json's metrics as {name: description}, in order (or None if it lists none)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {str(k): str(v or "") for k, v in value.items()}
    out: dict[str, str] = {}
    for i, m in enumerate(_list(value, where)):
        if isinstance(m, str):
            out[m] = ""
        elif isinstance(m, dict) and isinstance(m.get("name"), str):
            out[m["name"]] = str(_first(m, "description", "doc", default="")[1] or "")
        else:
            raise (where / i).error(f"expected a metric name or {{name, description}}, got {m!r}")
    return out


def _parse_scatter(value: Any, where: _Where) -> dict[tuple[int, int], tuple[dict, _Where]]:
    """scatter_data.json as {(layer, head): (record, where)}; values are read per metric later."""
    if isinstance(value, dict):
        _, value = _first(value, "heads", "data", "records", "points", default=value)
    out: dict[tuple[int, int], tuple[dict, _Where]] = {}
    for i, rec in enumerate(_list(value, where)):
        w = where / i
        rec = _dict(rec, w)
        if "layer" in rec and "head" in rec:
            lh = (_int(rec["layer"], w / "layer"), _int(rec["head"], w / "head"))
        else:
            key, ident = _first(rec, "id", "name", "head_id")
            if key is None:
                raise w.error("a scatter record needs 'layer' and 'head'")
            lh = _head_id(ident, w / key)
        out[lh] = (rec, w)
    return out


def _numeric_keys(d: dict) -> set[str]:
    """Keys of ``d`` whose values read as numbers (to find metrics when config lists none)."""
    found = set()
    for k, v in d.items():
        try:
            _float(v, _Where(Path()))
        except ValueError:
            continue
        found.add(k)
    return found - _SCATTER_ID_KEYS


def _head_file(tree: Path, layer: int, head: int) -> Path:
    names = [f"{head_name(layer, head)}.json", f"{layer}_{head}.json"]
    for n in names:
        if (tree / "heads" / n).is_file():
            return tree / "heads" / n
    raise ValueError(
        f"{tree}: head {head_name(layer, head)} has no file "
        f"(looked for {' and '.join('heads/' + n for n in names)})"
    )


def _derive_maxima(n: int, sparse: list[list]) -> tuple[list[float], list[float]]:
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
