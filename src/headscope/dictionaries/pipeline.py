"""Train dictionaries on a model's activations, label their features, and report on heads.

Output layout of one ``train-sae`` run (``out/``), one folder per SAE, named by site key::

    out/resid_L3/    cfg.json + sae_weights.safetensors   (SAELens layout, see .sae)
                     stats.json        TrainConfig + TrainStats + where the data stream stopped
                     features.json     hover cards (see .labels) + features_meta.json
    out/z_L5/        ... + head_report.json, head_report.md   (z_head_report)
    out/v_L3+L4/     ... + clusters.json, cluster_sizes.svg    (value_cluster_report)

Saved SAEs have the training-time activation scale folded into their weights, so they compute
the same thing in SAELens as here. ``out/`` can be given to ``--basis sae:DIR``: the residual
SAEs in it become an attribution basis, the z and v ones are skipped there.

Head attribution of z features (Kissane et al. 2024, seed 004): a z-SAE reconstructs all heads'
outputs of a layer concatenated, so the decoder row of a feature splits into one slice per head;
each slice's norm over the row's sum of slice norms is that head's share of the feature.
Value-SAE head loadings (Jermyn et al. 2025, seed 001): the same shares over the key/value heads
of one or two layers, clustered with k-means over a sweep of k.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headscope.dictionaries.activations import iter_activations, site_dim, site_key
from headscope.dictionaries.clusters import head_loadings, kmeans_sweep, plot_cluster_sizes
from headscope.dictionaries.labels import (
    FEATURES_FILENAME,
    FEATURES_META_FILENAME,
    feature_densities,
    label_features,
    load_cards,
    marked_token,
)
from headscope.dictionaries.sae import SAEConfig, load_sae, save_sae
from headscope.dictionaries.train import TrainStats, train_saes
from headscope.model import ModelAdapter
from headscope.model.spec import head_name

SITES = ("resid", "z", "v")
STATS_FILENAME = "stats.json"
HEAD_REPORT_FILENAME = "head_report.json"
CLUSTERS_FILENAME = "clusters.json"
CLUSTERS_SVG_FILENAME = "cluster_sizes.svg"
# Files derived from an SAE's weights: removed when a new SAE is saved into its folder.
_DERIVED = (
    STATS_FILENAME,
    FEATURES_FILENAME,
    FEATURES_META_FILENAME,
    HEAD_REPORT_FILENAME,
    "head_report.md",
    CLUSTERS_FILENAME,
    CLUSTERS_SVG_FILENAME,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``train_dictionaries`` call was given (written into each ``stats.json``)."""

    model: str
    model_source: str
    data: str
    text_field: str
    sites: tuple[str, ...]  # site keys, e.g. ("resid_L3", "resid_L4") or ("v_L3+L4",)
    n_features: int
    k: int
    n_tokens: int
    seq_len: int
    batch_size: int  # sequences per forward pass
    sae_batch_size: int  # activation rows per optimiser step
    n_eval: int
    seed: int
    lr: float
    label_tokens: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = list(self.sites)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        kw = {f.name: d[f.name] for f in fields(cls)}
        kw["sites"] = tuple(kw["sites"])
        return cls(**kw)


def default_lr(n_features: int) -> float:
    """Adam learning rate for short runs: 2e-3 · sqrt(2048 / n_features).

    Gao et al.'s 2e-4 / sqrt(n_features / 2^14) (the trainer's default) is tuned for runs of
    billions of tokens; with the ~1M tokens a CPU run sees, 3.5x that learns faster (SmolLM2-135M
    layer 3, 2048 features, k=32, 400k tokens, batches of 1024: explained variance 0.939 vs 0.915).
    The 1/sqrt(n_features) scaling is Gao et al.'s.
    """
    return 2e-3 * math.sqrt(2048 / n_features)


def dictionary_sites(site: str, layers: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(site, layers) of the SAEs one ``train_dictionaries`` call trains.

    resid and z: one SAE per layer. v: one SAE on the concatenated values of the (one or two)
    layers, which is what cross-layer head loadings need.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("give at least one layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat: {layers}")
    if site == "v":
        if len(layers) > 2:
            raise ValueError(f"a value SAE reads one or two layers, got {layers}")
        return [("v", tuple(sorted(layers)))]
    return [(site, (layer,)) for layer in layers]


def _counted(chunks: Iterable[dict[str, torch.Tensor]], counter: list[int]) -> Iterator[dict]:
    for chunk in chunks:
        counter[0] += 1
        yield chunk


def train_sites(
    model: str | ModelAdapter,
    data: Path | None,
    sites: Sequence[tuple[str, Sequence[int]]],
    *,
    out: Path,
    n_features: int = 2048,
    k: int = 32,
    n_tokens: int = 200_000,
    seq_len: int = 256,
    batch_size: int = 8,
    sae_batch_size: int = 1024,
    n_eval: int = 8192,
    seed: int = 0,
    lr: float | None = None,
    label_tokens: int = 100_000,
    text_field: str = "text",
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train one TopK SAE per ``(site, layers)`` in lockstep from one activation stream.

    Same as :func:`train_dictionaries` but with the SAEs listed explicitly, so residual, z and
    value SAEs of different layers can share one pass over the data.
    """
    say = log or (lambda _msg: None)
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter.load(model, device=device)
    s = adapter.spec
    norm_sites = [(site, tuple(int(x) for x in layers)) for site, layers in sites]
    for site, layers in norm_sites:
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        bad = [layer for layer in layers if not 0 <= layer < s.n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: the model has {s.n_layers} layers")
        if not 1 <= len(layers) <= (2 if site == "v" else 1):
            raise ValueError(
                f"a {site} SAE reads {'one or two layers' if site == 'v' else 'one layer'}"
            )
    keys = [site_key(site, layers) for site, layers in norm_sites]
    if len(set(keys)) != len(keys):
        raise ValueError(f"SAEs repeat: {keys}")
    if not 1 <= k <= n_features:
        raise ValueError(f"need 1 <= k <= n_features, got k={k}, n_features={n_features}")
    lr = default_lr(n_features) if lr is None else lr
    if data is None:
        from headscope.data.corpus import ensure_default_corpus

        data = ensure_default_corpus()
    data = Path(data)
    cfg = TrainConfig(
        model=adapter.name,
        model_source=adapter.source,
        data=str(data),
        text_field=text_field,
        sites=tuple(keys),
        n_features=n_features,
        k=k,
        n_tokens=n_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        sae_batch_size=sae_batch_size,
        n_eval=n_eval,
        seed=seed,
        lr=lr,
        label_tokens=label_tokens,
    )
    sae_cfgs = {
        key: SAEConfig(
            d_in=site_dim(adapter, site, layers),
            d_sae=n_features,
            k=k,
            site=site,  # type: ignore[arg-type]
            layers=layers,
            model_name=adapter.name,
            normalize_activations="expected_average_only_in",
            # Head sizes let reports split a z/v decoder row into heads without the model.
            extra={"n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "d_head": s.d_head},
        )
        for key, (site, layers) in zip(keys, norm_sites, strict=True)
    }
    load_start = os.getloadavg()[0]
    say(
        f"train: {', '.join(keys)} on {adapter.name}: {n_features} features, k={k}, "
        f"{n_tokens:,} tokens from {data} (load average {load_start:.1f})"
    )
    chunks = [0]
    stream = iter_activations(
        adapter,
        data,
        norm_sites,
        n_tokens=n_tokens + n_eval,
        seq_len=seq_len,
        batch_size=batch_size,
        text_field=text_field,
    )
    saes, stats = train_saes(
        _counted(stream, chunks),
        sae_cfgs,
        n_tokens=n_tokens,
        lr=lr,
        batch_size=sae_batch_size,
        n_eval=n_eval,
        seed=seed,
        device=adapter.device,
        log=log,
    )
    load_end = os.getloadavg()[0]
    out = Path(out)
    result: dict[str, Any] = {"out": str(out), "config": cfg.to_dict(), "saes": {}}
    for key in keys:
        sae, st = saes[key], stats[key]
        folder = out / key
        for name in _DERIVED:
            (folder / name).unlink(missing_ok=True)
        save_sae(sae.with_norm_scaling_folded(), folder)
        record = {
            "config": cfg.to_dict(),
            "stats": st.to_dict(),
            "norm_scaling_factor": sae.cfg.norm_scaling_factor,
            # Packed sequences the stream read (label_features skips them by default).
            "sequences_seen": chunks[0] * batch_size,
            "load_average": [round(load_start, 2), round(load_end, 2)],
        }
        (folder / STATS_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
        say(f"train: {key}: {format_stats(st)}")
        result["saes"][key] = {"path": str(folder), **record}

    if label_tokens > 0:
        folders = [out / key for key in keys]
        label_features(
            adapter,
            folders,
            data,
            n_tokens=label_tokens,
            skip_sequences=chunks[0] * batch_size,
            seq_len=seq_len,
            batch_size=batch_size,
            text_field=text_field,
            log=log,
        )
    for key, (site, _) in zip(keys, norm_sites, strict=True):
        folder = out / key
        if site == "z":
            rep = z_head_report(folder)
            result["saes"][key]["head_report"] = str(folder / HEAD_REPORT_FILENAME)
            say(f"report: {key}: {_head_summary_line(rep)}")
        elif site == "v":
            n_live = _live_count(folder)
            ks = tuple(x for x in (2, 4, 8, 16, 32) if x <= n_live)
            if ks:
                rep = value_cluster_report(folder, ks=ks)
                result["saes"][key]["clusters"] = str(folder / CLUSTERS_FILENAME)
                slopes = ", ".join(
                    f"k={kk}: {v['loglog_slope']:+.2f}"
                    for kk, v in rep["sweep"].items()
                    if v["loglog_slope"] is not None
                )
                say(f"report: {key}: cluster-size log-log slopes {slopes}")
    return result


def train_dictionaries(
    model: str | ModelAdapter,
    data: Path | None,
    site: str,
    layers: Sequence[int],
    *,
    out: Path,
    n_features: int = 2048,
    k: int = 32,
    n_tokens: int = 200_000,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    lr: float | None = None,
    label_tokens: int = 100_000,
    sae_batch_size: int = 1024,
    n_eval: int = 8192,
    text_field: str = "text",
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train TopK SAEs on one site of ``model`` and write them with labels and reports.

    site ``resid`` (residual stream entering the layer) or ``z`` (per-head attention outputs
    before W_O): one SAE per layer. ``v``: one SAE on the concatenated values of the one or two
    layers. All SAEs train in lockstep from one activation stream (each forward pass feeds all
    of them and stops after the deepest layer). data None = the default corpus.

    n_tokens: training tokens (BOS left out), after ``n_eval`` held-out tokens the stats are
    measured on. batch_size: sequences of ``seq_len`` tokens per forward pass; sae_batch_size:
    rows per optimiser step. lr: Adam learning rate, default :func:`default_lr`.
    label_tokens: tokens read after the training stretch for ``features.json`` (0: no labels).
    text_field: the field holding the text in JSONL/Parquet data. device: where a model given
    by name is loaded; the SAEs train on the model's device.
    Then ``z`` SAEs get :func:`z_head_report` and ``v`` SAEs :func:`value_cluster_report`.

    Writes ``out/{site key}/`` per SAE (see the module docstring) and returns
    ``{"out", "config", "saes": {site key: {"path", "stats", ...}}}``.
    """
    return train_sites(
        model,
        data,
        dictionary_sites(site, layers),
        out=out,
        n_features=n_features,
        k=k,
        n_tokens=n_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        sae_batch_size=sae_batch_size,
        n_eval=n_eval,
        seed=seed,
        lr=lr,
        label_tokens=label_tokens,
        text_field=text_field,
        device=device,
        log=log,
    )


def format_stats(st: TrainStats) -> str:
    """One line: normalised MSE, explained variance, L0, dead fraction, tokens, seconds."""

    def num(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    return (
        f"normalised MSE {num(st.normalized_mse, '.4f')}, "
        f"explained variance {num(st.explained_variance, '.4f')}, "
        f"L0 {num(st.mean_l0, '.1f')}, dead {st.dead_fraction:.1%} "
        f"(never fired on held-out rows {num(st.dead_fraction_eval, '.1%')}), "
        f"{st.tokens:,} tokens in {st.seconds:.0f}s ({st.tokens_per_second:,.0f} tok/s)"
    )


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


def _groups(keysets: list[set[str]]) -> list[int]:
    """Group index of each item: items sharing any key are linked (transitively)."""
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
      (case and spaces ignored); ``effective_groups`` = exp(entropy) of the groups' summed scores.
      1 suggests one role; close to ``top`` suggests unrelated features (polysemantic). A
      heuristic to read with the listed contexts, not a proof either way.

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
    cards = load_cards(folder)
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
        by_share = np.argsort(-np.where(live, shares[:, h], -1.0), kind="stable")[:top]
        group_of = _groups([_group_keys(cards.get(str(f))) for f in order])
        group_w = np.zeros(max(group_of, default=-1) + 1)
        for f, g in zip(order, group_of, strict=True):
            group_w[g] += score[f, h]
        for row, g in zip(tops, group_of, strict=True):
            row["group"] = g
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
                "top_by_share": [entry(int(f), h) for f in by_share if live[f]],
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
        "heads": head_rows,
        "features": features,
    }
    (folder / HEAD_REPORT_FILENAME).write_text(
        json.dumps(report, ensure_ascii=False, separators=(",", ":")) + "\n"
    )
    (folder / "head_report.md").write_text(_head_report_md(report))
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
        "| head | dominant | activity | eff. features | groups (eff.) | top features |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["heads"]:
        tops = "<br>".join(
            f"#{t['feature']} ({t['share']:.2f}) `{_md_cell(t.get('context') or '')}` → "
            + " ".join(f"`{_md_cell(_show(p))}`" for p in t.get("promoted", [])[:3])
            for t in row["top_features"][:3]
        )
        lines.append(
            f"| {row['head']} | {row['n_dominant']} ({row['n_majority']}) | "
            f"{row['activity']:.1%} | {row['effective_features']:.0f} | "
            f"{row['n_groups']} ({row['effective_groups']:.1f}) | {tops} |"
        )
    return "\n".join(lines) + "\n"


def _head_summary_line(report: dict[str, Any]) -> str:
    return "; ".join(
        f"{r['head']} dominates {r['n_dominant']}, groups {r['effective_groups']:.1f}"
        for r in report["heads"]
    )


# ----- value-SAE head loadings --------------------------------------------------------------------
def _live_count(folder: Path) -> int:
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
    (folder / CLUSTERS_FILENAME).write_text(json.dumps(report, indent=1) + "\n")
    plot_cluster_sizes(
        sweep,
        folder / CLUSTERS_SVG_FILENAME,
        title=f"k-means cluster sizes of head loadings, {site_key('v', cfg.layers)} "
        f"({int(live.sum())} features)",
    )
    return report


__all__ = [
    "TrainConfig",
    "dictionary_sites",
    "format_stats",
    "train_dictionaries",
    "train_sites",
    "value_cluster_report",
    "z_head_report",
]
