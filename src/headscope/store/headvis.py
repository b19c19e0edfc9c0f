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

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headscope.model.spec import head_name
from headscope.store.files import read_json, write_json
from headscope.store.headvis_parse import (
    _derive_maxima,
    _dict,
    _first,
    _Head,
    _head_file,
    _head_id,
    _int,
    _list,
    _load,
    _numeric_keys,
    _parse_head,
    _parse_metric_list,
    _parse_scatter,
    _Where,
)
from headscope.store.run import open_run

__all__ = ["export_headvis", "import_headvis"]

FORMAT = "headvis"
FORMAT_VERSION = 1
SCHEMA_VERSION = 1  # of the run directory the import writes (docs/run-format.md)
SIG_DIGITS = 6


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
