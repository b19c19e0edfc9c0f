"""HeadVis interchange: write a run as a HeadVis data tree, read such a tree back as a run.

The HeadVis data tree (docs/headvis-format.md) is the layout the HeadVis frontend reads and
HeadVis exports publish: ``config.json``, ``scatter_data.json`` and one ``heads/L{l}H{h}.json``
per head, with example sequences as token strings and sparse attention patterns. The export is
deterministic (sorted keys, every float rounded to 6 significant digits), so exporting a run,
importing the tree and exporting again gives the same bytes. The import tolerates the variations
a published tree may have and rejects a malformed one with a ``ValueError`` naming the file;
either function builds its output in a temporary directory beside the target and renames it into
place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headscope.model.spec import head_name
from headscope.store.files import read_json, write_json
from headscope.store.run import open_run

__all__ = ["export_headvis", "import_headvis"]

FORMAT = "headvis"
FORMAT_VERSION = 1
SCHEMA_VERSION = 1  # of the run directory the import writes (docs/run-format.md)
SIG_DIGITS = 6

# keys of a scatter record that name the head rather than measure it
_SCATTER_ID_KEYS = frozenset({"layer", "head", "id", "name", "head_id", "label"})


# ----------------------------------------------------------------------------- shared helpers


def _canon(value: Any) -> Any:
    """A JSON-ready copy with sorted keys and every float at SIG_DIGITS significant digits.

    Rounding through the decimal text is idempotent, so re-exporting imported values is exact.
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
        if not math.isfinite(x):
            raise ValueError(f"cannot export the non-finite number {x}")
        return float(f"{x:.{SIG_DIGITS}g}")
    raise TypeError(f"cannot export a {type(value).__name__}")


def _is_tree(path: Path) -> bool:
    try:
        return read_json(path / "config.json").get("format") == FORMAT
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


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """Yield a fresh directory beside ``target``; on success it replaces ``target`` whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        tmp.rename(target)
        return
    # move the old version aside first: the target is never missing a file of either version
    graveyard = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    target.rename(graveyard / "old")
    tmp.rename(target)
    shutil.rmtree(graveyard, ignore_errors=True)


# ----------------------------------------------------------------------------------- export


def _read_vocab(path: Path) -> dict[int, str]:
    raw = read_json(path)
    if isinstance(raw, list):
        return dict(enumerate(raw))
    return {int(k): v for k, v in raw.items()}


def _export_sequence(example: dict, vocab: dict[int, str], where: str) -> dict:
    try:
        tokens = [vocab[t] for t in example["tokens"]]
    except KeyError as e:
        raise ValueError(f"{where}: token id {e.args[0]} is not in vocab.json") from None
    return {
        "sequence_index": example["sequence"],
        "tokens": tokens,
        "max_attention": example["max_attention"],
        "doc_starts": example.get("doc_starts", []),
        "sparse_attention": example.get("sparse", []),
    }


def _export_tokens(rows: list[dict]) -> list[dict]:
    return [{"token": r["token"], "mass": r["mass"], "count": r["count"]} for r in rows]


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
    docs = run.metric_docs
    records = [
        {"layer": int(row["layer"]), "head": int(row["head"]), **{n: row[n] for n in names}}
        for row in table.to_dict("records")
    ]
    for rec in records:
        bad = [n for n in names if not math.isfinite(rec[n])]
        if bad:
            name = head_name(rec["layer"], rec["head"])
            raise ValueError(f"{run.path / 'metrics.parquet'}: {name} has non-finite {bad}")
    heads = [head_name(r["layer"], r["head"]) for r in records]
    manifest = run.manifest
    model = dict(manifest.get("model", {}))
    n_layers = int(model.get("n_layers", max((r["layer"] for r in records), default=-1) + 1))
    n_heads = int(model.get("n_heads", max((r["head"] for r in records), default=-1) + 1))
    model.update(n_layers=n_layers, n_heads=n_heads)
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "dataset": manifest.get("dataset", {}),
        "metrics": [{"name": n, "description": docs.get(n, "")} for n in names],
        "n_layers": n_layers,
        "n_heads": n_heads,
        "heads": heads,
    }
    if "tokens" in manifest:
        config["tokens"] = manifest["tokens"]
    made_by = manifest.get("config", {})
    precompute = made_by.get("precompute") if "imported_from" in made_by else made_by
    if precompute:
        config["precompute"] = precompute

    with _staged(out) as tmp:
        write_json(tmp / "config.json", _canon(config), indent=2)
        write_json(tmp / "scatter_data.json", _canon(records))
        for name, rec in zip(heads, records, strict=True):
            payload = run.head(name)
            examples = payload.get("examples", [])
            where = f"{run.path / 'heads' / name}.json"
            doc: dict[str, Any] = {
                "id": name,
                "layer": rec["layer"],
                "head": rec["head"],
                "statistics": {n: rec[n] for n in names},
                "top_query_tokens": _export_tokens(payload.get("top_query_tokens", [])),
                "top_key_tokens": _export_tokens(payload.get("top_key_tokens", [])),
                "deciles": [
                    {
                        "interval": [b["lo"], b["hi"]],
                        "sequences": [
                            _export_sequence(examples[i], vocab, where) for i in b["examples"]
                        ],
                    }
                    for b in payload.get("buckets", [])
                ],
            }
            if "histogram" in payload:
                hist = payload["histogram"]
                doc["histogram"] = {"bin_edges": hist["edges"], "counts": hist["counts"]}
            write_json(tmp / "heads" / f"{name}.json", _canon(doc))
    return out


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


def import_headvis(tree: Path | str, run_dir: Path | str) -> Path:
    """Read the HeadVis data tree ``tree`` into a new run directory ``run_dir``; return it.

    Tolerates missing optional fields (histogram, top tokens, sequence indices, document
    starts), ``{l}_{h}.json`` head file names and numbers written as strings. Token strings
    get ids in sorted order. Fields HeadVis does not carry (PCA, similar heads, curves, motif
    maps) are left empty. ``run_dir`` must not exist, be empty, or hold an earlier import (which
    is replaced). Raises ``ValueError`` naming the file and the problem for a malformed tree,
    and then writes nothing.
    """
    tree, run_dir = Path(tree), Path(run_dir)
    if not (tree / "config.json").is_file():
        raise ValueError(f"{tree}: no config.json; this is not a HeadVis data tree")
    _check_target(run_dir, _is_imported_run, "run imported from HeadVis")
    cfg_where = _Where(tree / "config.json")
    config = _dict(_load(tree / "config.json"), cfg_where)
    metric_docs = _parse_metric_list(config.get("metrics"), cfg_where / "metrics")

    version = config.get("format_version", FORMAT_VERSION)
    if config.get("format") == FORMAT and _int(version, cfg_where) > FORMAT_VERSION:
        raise cfg_where.error(
            f"format_version {version} is newer than this headscope reads ({FORMAT_VERSION})"
        )
    scatter: dict[tuple[int, int], tuple[dict, _Where]] = {}
    if (tree / "scatter_data.json").is_file():
        sw = _Where(tree / "scatter_data.json")
        scatter = _parse_scatter(_load(tree / "scatter_data.json"), sw)

    if "heads" in config:
        hw = cfg_where / "heads"
        heads = [_head_id(h, hw / i) for i, h in enumerate(_list(config["heads"], hw))]
    elif scatter:
        heads = list(scatter)
    else:
        heads = []
        for p in sorted((tree / "heads").glob("*.json")):
            try:
                heads.append(_head_id(p.stem, _Where(p)))
            except ValueError:
                continue
    heads = sorted(set(heads))
    if not heads:
        raise cfg_where.error("the tree lists no heads (no 'heads', scatter records or files)")

    model_raw = config.get("model", {})
    model = dict(model_raw) if isinstance(model_raw, dict) else {"name": str(model_raw)}
    n_layers = _int(
        config.get("n_layers", model.get("n_layers", heads[-1][0] + 1)), cfg_where / "n_layers"
    )
    n_heads = _int(
        config.get("n_heads", model.get("n_heads", max(h for _, h in heads) + 1)),
        cfg_where / "n_heads",
    )
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise cfg_where.error(
                f"head {head_name(layer, head)} is outside {n_layers} layers x {n_heads} heads"
            )
    model.update(n_layers=n_layers, n_heads=n_heads)
    files = {lh: _head_file(tree, *lh) for lh in heads}
    if metric_docs is None:
        found = set().union(*(_numeric_keys(rec) for rec, _ in scatter.values()))
        if not found:
            for path in files.values():
                d = _dict(_load(path), _Where(path))
                key, stats = _first(d, "statistics", "stats", "metrics", default={})
                found |= _numeric_keys(_dict(stats, _Where(path) / (key or "statistics")))
        metric_docs = dict.fromkeys(sorted(found), "")
    metric_names = list(metric_docs)

    def parse(lh: tuple[int, int]) -> _Head:
        return _parse_head(files[lh], *lh, metric_names, scatter.get(lh))

    # pass 1: validate every head and collect the token strings and unnumbered sequences
    strings: set[str] = set()
    unnumbered: dict[str, int] = {}
    top_index = -1
    metric_rows = []
    for lh in heads:
        h = parse(lh)
        strings.update(h.strings())
        for _, _, seqs in h.deciles:
            for s in seqs:
                if s.index is None:
                    unnumbered.setdefault(s.digest(), len(unnumbered))
                else:
                    top_index = max(top_index, s.index)
        metric_rows.append([*lh, *(h.statistics[n] for n in metric_names)])
    ids = {s: i for i, s in enumerate(sorted(strings))}

    dataset = config.get("dataset", {})
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "config": {"imported_from": str(tree)},
        "model": model,
        "dataset": dataset if isinstance(dataset, dict) else {"name": str(dataset)},
        "layers": sorted({layer for layer, _ in heads}),
        "metrics": metric_docs,
    }
    if isinstance(config.get("precompute"), dict):
        manifest["config"]["precompute"] = config["precompute"]
    if isinstance(config.get("tokens"), dict):
        manifest["tokens"] = config["tokens"]

    with _staged(run_dir) as tmp:
        # pass 2: parse again (already validated) and write one head at a time
        for lh in heads:
            h = parse(lh)
            examples: list[dict] = []
            buckets: list[dict] = []
            for lo, hi, seqs in h.deciles:
                idx = []
                for s in seqs:
                    as_query, as_key = _derive_maxima(len(s.tokens), s.sparse)
                    idx.append(len(examples))
                    examples.append(
                        {
                            "sequence": s.index
                            if s.index is not None
                            else top_index + 1 + unnumbered[s.digest()],
                            "max_attention": s.max_attention,
                            "tokens": [ids[t] for t in s.tokens],
                            "doc_starts": s.doc_starts,
                            "max_as_query": as_query,
                            "max_as_key": as_key,
                            "sparse": s.sparse,
                        }
                    )
                buckets.append({"lo": lo, "hi": hi, "examples": idx})

            def rows(tokens: list[tuple[str, float, int]]) -> list[dict]:
                return [{"token": t, "id": ids[t], "mass": m, "count": c} for t, m, c in tokens]

            name = head_name(*lh)
            payload: dict[str, Any] = {
                "head": name,
                "layer": h.layer,
                "index": h.head,
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
            write_json(tmp / "heads" / f"{name}.json", payload)

        df = pd.DataFrame(metric_rows, columns=["layer", "head", *metric_names])
        df = df.astype(
            {"layer": "int64", "head": "int64", **dict.fromkeys(metric_names, "float64")}
        )
        df.insert(2, "name", [head_name(layer, head) for layer, head in heads])
        df.to_parquet(tmp / "metrics.parquet", index=False)
        write_json(
            tmp / "metrics.json",
            {"columns": ["layer", "head", *metric_names], "rows": metric_rows, "docs": metric_docs},
        )
        write_json(tmp / "vocab.json", {str(i): s for s, i in ids.items()})
        write_json(tmp / "manifest.json", manifest, indent=2)
    return run_dir
