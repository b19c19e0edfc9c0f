"""Reports on trained dictionaries, read from an SAE folder of a ``train-sae`` run.

* :func:`z_head_report` -- head attribution of z features ("We Inspected Every Head in GPT-2 Small Using SAEs"): a
  z-SAE reconstructs all heads' outputs of a layer concatenated, so the decoder row of a feature
  splits into one slice per head; each slice's norm over the row's sum of slice norms is that
  head's share of the feature. Writes ``head_report.json`` and ``head_report.md``.
* :func:`value_cluster_report` -- value-SAE head loadings ("Progress on Attention"): the
  same shares over the key/value heads of one or two layers, clustered with k-means over a
  sweep of k. Writes ``clusters.json`` and ``cluster_sizes.svg``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headscope.dictionaries.activations import site_key
from headscope.dictionaries.clusters import head_loadings, kmeans_sweep, plot_cluster_sizes
from headscope.dictionaries.labels import (
    feature_densities,
    load_cards,
    marked_token,
)
from headscope.dictionaries.sae import SAEConfig, load_sae
from headscope.files import write_json, write_text
from headscope.model.spec import head_name

HEAD_REPORT_FILENAME = "head_report.json"
CLUSTERS_FILENAME = "clusters.json"
CLUSTERS_SVG_FILENAME = "cluster_sizes.svg"
# The head classes of "We Inspected Every Head in GPT-2 Small Using SAEs", from its top 10
# features by decoder-norm share: all related; all but one or two; two groups; more.
SEMANTIC_CLASSES = ("monosemantic", "mostly monosemantic", "bisemantic", "polysemantic")
EXCEPTIONS_PER_TEN = 2  # "all features ... related with just one or two exceptions"
# Two of a head's features are related when they share a token (see _group_keys) or when the
# head writes nearly the same direction for both (cosine of their decoder slices >= this).
LINK_COSINE = 0.5
# A token among the cards of more than this share of the layer's live features (and more than
# COMMON_MIN of them) relates nothing: ",", " the", and the few tokens an early layer's decoder
# directions all promote (in the default model's layer 0, one token is among 36% of the cards).
COMMON_SHARE = 0.02
COMMON_MIN = 5


# ----- z-SAE head attribution ---------------------------------------------------------------------
def _head_sizes(cfg: SAEConfig, n_heads: int | None, key: str, per_layer: int) -> tuple[int, int]:
    """(heads per layer, d_head) of a z (key n_heads) or v (key n_kv_heads) SAE."""
    n = n_heads if n_heads is not None else cfg.extra.get(key)
    if n is None:
        raise ValueError(f"{cfg.hook_name}: cfg.json has no {key!r}; pass it (the model's {key})")
    n = int(n)
    if cfg.d_in % (n * per_layer):
        raise ValueError(f"d_in={cfg.d_in} is not a multiple of {per_layer} layer(s) × {n} heads")
    return n, cfg.d_in // (n * per_layer)


def _entropy_exp(weights: np.ndarray) -> float:
    """exp(entropy) of a non-negative weight vector: the effective number of its entries."""
    total = float(weights.sum())
    if total <= 0:
        return 0.0
    p = weights[weights > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _norm_token(token: str) -> str:
    return token.strip().lower()


def _groups(keysets: list[set[str]], links: Iterable[tuple[int, int]] = ()) -> list[int]:
    """Group index of each item: items sharing any key, or joined by a link, are linked
    (transitively)."""
    parent = list(range(len(keysets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, keys in enumerate(keysets):
        for key in keys:
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    for i, j in links:
        parent[find(i)] = find(j)
    roots = [find(i) for i in range(len(keysets))]
    index = {r: j for j, r in enumerate(dict.fromkeys(roots))}
    return [index[r] for r in roots]


def _label(card: Mapping[str, Any] | None) -> dict[str, Any]:
    """A feature's short label: its top context and first promoted tokens (from its card)."""
    if not card:
        return {}
    contexts = card.get("top_contexts") or []
    return {
        "context": contexts[0] if contexts else None,
        "promoted": list(card.get("promoted", []))[:5],
    }


def _group_keys(card: Mapping[str, Any] | None) -> set[str]:
    if not card:
        return set()
    tokens = [marked_token(c) for c in (card.get("top_contexts") or [])[:3]]
    tokens += list(card.get("promoted", []))[:3]
    return {t for t in map(_norm_token, tokens) if t}


def _cosine_links(slices: np.ndarray, min_cosine: float = LINK_COSINE) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of ``slices [n, D]`` (one head's decoder slices of n features) whose
    cosine is at least ``min_cosine``: the head writes nearly the same direction for both."""
    norms = np.linalg.norm(slices, axis=1, keepdims=True)
    unit = np.divide(slices, norms, out=np.zeros_like(slices), where=norms > 0)
    cos = unit @ unit.T  # [n, n]
    i, j = np.nonzero(np.triu(cos >= min_cosine, k=1))
    return [(int(a), int(b)) for a, b in zip(i, j, strict=True)]


def semantic_class(group_sizes: Iterable[int]) -> int | None:
    """The class of a head whose top features fall into groups of these sizes: 1
    monosemantic (one group), 2 mostly monosemantic (all but ``EXCEPTIONS_PER_TEN`` in 10, i.e.
    one or two of the top 10, in one group), 3 bisemantic (two groups), 4 polysemantic (more);
    None without features. The classes of "We Inspected Every Head in GPT-2 Small Using SAEs",
    with this module's test of relatedness in place of its annotator."""
    sizes = sorted((int(x) for x in group_sizes if x > 0), reverse=True)
    n = sum(sizes)
    if not n:
        return None
    exceptions = n - sizes[0]
    if exceptions == 0:
        return 1
    if exceptions <= EXCEPTIONS_PER_TEN * n // 10:
        return 2
    return 3 if len(sizes) == 2 else 4


def _common_keys(cards: Mapping[str, Any]) -> set[str]:
    """Tokens in the keys of more than COMMON_SHARE of the live features (and > COMMON_MIN)."""
    live = [c for c in cards.values() if c.get("density", 1) > 0]
    counts = Counter(k for c in live for k in _group_keys(c))
    most = max(COMMON_MIN, COMMON_SHARE * len(live))
    return {k for k, n in counts.items() if n > most}


def _feature_groups(
    order: list[int], cards: Mapping[str, Any], slices: np.ndarray, common: set[str]
) -> tuple[list[int], list[int]]:
    """Group of each feature in ``order`` (linked: a shared token that is not ``common``, or
    decoder slices of the head with cosine >= ``LINK_COSINE``) and the groups' sizes."""
    group_of = _groups(
        [_group_keys(cards.get(str(f))) - common for f in order], _cosine_links(slices[order])
    )
    return group_of, [int(x) for x in np.bincount(group_of)] if group_of else []


def z_head_report(
    folder: str | os.PathLike[str], *, n_heads: int | None = None, top: int = 10
) -> dict[str, Any]:
    """Attribute each feature of a z-SAE to heads; write ``head_report.json`` + ``.md``.

    A feature's head shares are the norms of its decoder row's per-head slices (W_dec [F, H·D]
    -> [F, H]) divided by their sum (rows sum to 1). Each head's top features rank by
    share × density (density from ``features.json``; without it, by share alone). Per head:

    - ``top_by_share``: the live features with the largest share alone (Kissane et al.'s
      decoder-weight attribution: features the head writes nearly alone, however rare);
    - ``n_dominant``: live features whose largest share is this head's (``n_majority``: > 0.5);
    - ``activity``: this head's part of all feature activity, Σ_f share·density / Σ_f density;
    - ``effective_features``: exp(entropy) of share·density over all features — how many
      features the head's activity is spread over (1 = one feature);
    - ``n_groups`` / ``effective_groups`` among its top features: features are linked when they
      share an activating token (of their top 3 contexts) or one of their top 3 promoted tokens
      (case and spaces ignored; tokens in the cards of over 2% of the layer's features left
      out), or when the head's slices of their decoder rows have cosine >= ``LINK_COSINE``; ``effective_groups`` = exp(entropy) of the groups' summed scores.
      1 suggests one role; close to ``top`` suggests unrelated features (polysemantic). A
      heuristic to read with the listed contexts, not a proof either way;
    - ``group_sizes`` / ``class`` / ``class_index``: the same groups among ``top_by_share`` and
      the head's class from them (:func:`semantic_class`); the report's ``tally`` counts heads
      per class.

    n_heads: heads of the layer; default the ``n_heads`` that training stored in cfg.json.
    """
    folder = Path(folder)
    sae = load_sae(folder, dtype="float32")
    cfg = sae.cfg
    if cfg.site != "z" or len(cfg.layers) != 1:
        raise ValueError(f"{folder}: head attribution needs a one-layer z SAE, not {cfg.hook_name}")
    layer = cfg.layers[0]
    H, D = _head_sizes(cfg, n_heads, "n_heads", 1)
    F = cfg.d_sae
    shares = head_loadings(sae.W_dec, n_heads=H, d_head=D).astype(np.float64)  # [F, H]
    slices = sae.W_dec.detach().double().numpy().reshape(F, H, D)  # [F, H, D]
    cards = load_cards(folder)
    common = _common_keys(cards)
    dens_t = feature_densities(cards, F)
    density = np.ones(F) if dens_t is None else dens_t.numpy().astype(np.float64)  # [F]
    score = shares * density[:, None]  # [F, H]
    live = density > 0
    dominant = shares.argmax(1)  # [F]
    heads = [head_name(layer, h) for h in range(H)]

    features = [
        {
            "feature": f,
            "dominant": heads[int(dominant[f])],
            "share": round(float(shares[f, dominant[f]]), 4),
            "shares": [round(float(x), 4) for x in shares[f]],
            "density": None if dens_t is None else float(density[f]),
        }
        for f in range(F)
    ]
    total_activity = float(score.sum())

    def entry(f: int, h: int) -> dict[str, Any]:
        return {
            "feature": f,
            "share": round(float(shares[f, h]), 4),
            "density": None if dens_t is None else float(density[f]),
            "score": float(score[f, h]),
            **_label(cards.get(str(f))),
        }

    head_rows = []
    for h in range(H):
        ranked = np.argsort(-score[:, h], kind="stable")[:top]
        order = [int(f) for f in ranked if score[f, h] > 0]
        tops = [entry(f, h) for f in order]
        group_of, _ = _feature_groups(order, cards, slices[:, h], common)
        group_w = np.zeros(max(group_of, default=-1) + 1)
        for f, g in zip(order, group_of, strict=True):
            group_w[g] += score[f, h]
        for row, g in zip(tops, group_of, strict=True):
            row["group"] = g
        ranked = np.argsort(-np.where(live, shares[:, h], -1.0), kind="stable")[:top]
        by_share = [int(f) for f in ranked if live[f] and shares[f, h] > 0]
        share_group_of, sizes = _feature_groups(by_share, cards, slices[:, h], common)
        tops_by_share = [entry(f, h) for f in by_share]
        for row, g in zip(tops_by_share, share_group_of, strict=True):
            row["group"] = g
        cls = semantic_class(sizes)
        head_rows.append(
            {
                "head": heads[h],
                "n_dominant": int(((dominant == h) & live).sum()),
                "n_majority": int(((shares[:, h] > 0.5) & live).sum()),
                "activity": float(score[:, h].sum() / total_activity) if total_activity else 0.0,
                "effective_features": _entropy_exp(score[:, h]),
                "n_groups": len(group_w),
                "effective_groups": _entropy_exp(group_w),
                "top_features": tops,
                "top_by_share": tops_by_share,
                "group_sizes": sorted(sizes, reverse=True),
                "class": None if cls is None else SEMANTIC_CLASSES[cls - 1],
                "class_index": cls,
            }
        )
    report = {
        "sae": str(folder),
        "hook_name": cfg.hook_name,
        "layer": layer,
        "n_heads": H,
        "d_head": D,
        "n_features": F,
        "n_live": int(live.sum()),
        "ranked_by": "share" if dens_t is None else "share × density",
        "tally": {name: sum(r["class"] == name for r in head_rows) for name in SEMANTIC_CLASSES},
        "heads": head_rows,
        "features": features,
    }
    write_json(folder / HEAD_REPORT_FILENAME, report)
    write_text(folder / "head_report.md", _head_report_md(report))
    return report


def _show(token: str) -> str:
    """A token as the app shows it: spaces at its ends as ␣."""
    stripped = token.strip(" ")
    if not stripped:
        return "␣" * len(token)
    start = token.index(stripped)
    return "␣" * start + stripped + "␣" * (len(token) - start - len(stripped))


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", "↵").replace("`", "ˋ")


def _head_report_md(report: dict[str, Any]) -> str:
    lines = [
        f"# Head attribution of {report['hook_name']}",
        "",
        f"{report['n_features']} features ({report['n_live']} fire), ranked by "
        f"{report['ranked_by']}. Columns: live features a head dominates (largest share; "
        "> 0.5 in brackets), its part of all feature activity, the effective number of features "
        "its activity is spread over, and the effective number of token groups among its top "
        f"{len(report['heads'][0]['top_features']) if report['heads'] else 0} features "
        "(1 = one role). See docs/dictionaries.md.",
        "",
        "Heads by class (top 10 features by decoder-norm share): "
        + ", ".join(f"{n} {name}" for name, n in report.get("tally", {}).items())
        + ".",
        "",
        "| head | class | dominant | activity | eff. features | groups (eff.) | top features |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["heads"]:
        tops = "<br>".join(
            f"#{t['feature']} ({t['share']:.2f}) `{_md_cell(t.get('context') or '')}` → "
            + " ".join(f"`{_md_cell(_show(p))}`" for p in t.get("promoted", [])[:3])
            for t in row["top_features"][:3]
        )
        lines.append(
            f"| {row['head']} | {row.get('class') or ''} | {row['n_dominant']} ({row['n_majority']}) | "
            f"{row['activity']:.1%} | {row['effective_features']:.0f} | "
            f"{row['n_groups']} ({row['effective_groups']:.1f}) | {tops} |"
        )
    return "\n".join(lines) + "\n"


def head_summary_line(report: dict[str, Any]) -> str:
    return "; ".join(
        f"{r['head']} dominates {r['n_dominant']}, groups {r['effective_groups']:.1f}"
        for r in report["heads"]
    )


# ----- value-SAE head loadings --------------------------------------------------------------------
def live_feature_count(folder: Path) -> int:
    cfg = SAEConfig.from_dict(json.loads((folder / "cfg.json").read_text()))
    dens = feature_densities(load_cards(folder), cfg.d_sae)
    return cfg.d_sae if dens is None else int((dens > 0).sum())


def _loglog_slope(sizes: list[int]) -> float | None:
    """Least-squares slope of log(size) against log(rank); None with fewer than 3 clusters."""
    s = np.asarray([x for x in sizes if x > 0], dtype=np.float64)
    if len(s) < 3:
        return None
    rank = np.arange(1, len(s) + 1, dtype=np.float64)
    return float(np.polyfit(np.log(rank), np.log(s), 1)[0])


def value_cluster_report(
    folder: str | os.PathLike[str],
    ks: Iterable[int] = (2, 4, 8, 16, 32),
    *,
    n_kv_heads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Cluster a value SAE's features by head loading; write ``clusters.json`` + SVG.

    Each feature's head-loading vector is the norm of each key/value head's slice of its decoder
    row over their sum (:func:`head_loadings`; columns ``L{layer}KV{j}``, one per kv head of each
    layer the SAE reads; ``kv_heads`` lists the query heads ``L{layer}H{h}`` each one serves).
    Features that never fired (density 0 in ``features.json``) are left out. k-means runs for
    each k (:func:`kmeans_sweep`); ``cluster_sizes.svg`` plots size against rank, log-log, and
    ``loglog_slope`` is that line's least-squares slope (a power law is a straight line).

    n_kv_heads: default the ``n_kv_heads`` training stored in cfg.json.
    """
    folder = Path(folder)
    sae = load_sae(folder, dtype="float32")
    cfg = sae.cfg
    if cfg.site != "v" or not cfg.layers:
        raise ValueError(f"{folder}: head loadings need a value SAE, not {cfg.hook_name}")
    KV, D = _head_sizes(cfg, n_kv_heads, "n_kv_heads", len(cfg.layers))
    dens = feature_densities(load_cards(folder), cfg.d_sae)
    live = np.ones(cfg.d_sae, dtype=bool) if dens is None else (dens > 0).numpy()
    loadings = head_loadings(sae.W_dec.detach()[torch.from_numpy(live)], n_heads=KV, d_head=D)
    columns = [f"L{layer}KV{j}" for layer in cfg.layers for j in range(KV)]
    n_heads = int(cfg.extra.get("n_heads", KV))
    rep = max(1, n_heads // KV)
    kv_heads = {
        f"L{layer}KV{j}": [head_name(layer, h) for h in range(j * rep, (j + 1) * rep)]
        for layer in cfg.layers
        for j in range(KV)
    }
    ks = sorted({int(k) for k in ks})
    too_big = [k for k in ks if k > len(loadings)]
    if too_big:
        raise ValueError(f"k={too_big} exceed the {len(loadings)} live features")
    sweep = kmeans_sweep(loadings, ks, seed=seed)
    for entry in sweep.values():
        entry["loglog_slope"] = _loglog_slope(entry["sizes"])
    dominant = np.bincount(loadings.argmax(1), minlength=len(columns)) if len(loadings) else None
    report = {
        "sae": str(folder),
        "hook_name": cfg.hook_name,
        "layers": list(cfg.layers),
        "columns": columns,
        "kv_heads": kv_heads,
        "n_features": cfg.d_sae,
        "n_clustered": int(live.sum()),
        "n_dead_excluded": int((~live).sum()),
        "mean_loading": [round(float(x), 4) for x in loadings.mean(0)],
        "dominant_counts": [] if dominant is None else [int(x) for x in dominant],
        "seed": seed,
        "sweep": {str(k): v for k, v in sweep.items()},
    }
    write_json(folder / CLUSTERS_FILENAME, report, indent=1)
    plot_cluster_sizes(
        sweep,
        folder / CLUSTERS_SVG_FILENAME,
        title=f"k-means cluster sizes of head loadings, {site_key('v', cfg.layers)} "
        f"({int(live.sum())} features)",
    )
    return report
