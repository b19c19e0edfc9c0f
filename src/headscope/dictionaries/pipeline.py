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

The z and v reports (head attribution of z features, clustered value-SAE head loadings) are
in :mod:`headscope.dictionaries.reports`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from headscope.dictionaries.activations import iter_activations, site_dim, site_key
from headscope.dictionaries.labels import (
    FEATURES_FILENAME,
    FEATURES_META_FILENAME,
    label_features,
)
from headscope.dictionaries.reports import (
    CLUSTERS_FILENAME,
    CLUSTERS_SVG_FILENAME,
    HEAD_REPORT_FILENAME,
    head_summary_line,
    live_feature_count,
    value_cluster_report,
    z_head_report,
)
from headscope.dictionaries.sae import SAEConfig, save_sae
from headscope.dictionaries.train import TrainStats, train_saes
from headscope.files import write_json
from headscope.model import ModelAdapter

SITES = ("resid", "z", "v")
STATS_FILENAME = "stats.json"
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
    billions of tokens; with the ~1M tokens a CPU run sees, 3.5x that learns faster
    (SmolLM2-135M-Instruct layer 3, 2048 features, k=32, 400k tokens, batches of 1024: explained
    variance 0.939 vs 0.915).
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

    :func:`train_dictionaries` with the SAEs listed explicitly, so residual, z and value SAEs
    of different layers can share one pass over the data.

    n_tokens: training tokens (BOS left out), after ``n_eval`` held-out tokens the stats are
    measured on. batch_size: sequences of ``seq_len`` tokens per forward pass; sae_batch_size:
    rows per optimiser step. lr: Adam learning rate, default :func:`default_lr`.
    label_tokens: tokens read after the training stretch for ``features.json`` (0: no labels).
    text_field: the field holding the text in JSONL/Parquet data. device: where a model given
    by name is loaded; the SAEs train on the model's device.
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
        write_json(folder / STATS_FILENAME, record, indent=2)
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
            say(f"report: {key}: {head_summary_line(rep)}")
        elif site == "v":
            n_live = live_feature_count(folder)
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
    **options: Any,
) -> dict[str, Any]:
    """Train TopK SAEs on one site of ``model`` and write them with labels and reports.

    site ``resid`` (residual stream entering the layer) or ``z`` (per-head attention outputs
    before W_O): one SAE per layer. ``v``: one SAE on the concatenated values of the one or two
    layers. All SAEs train in lockstep from one activation stream (each forward pass feeds all
    of them and stops after the deepest layer). data None = the default corpus.

    ``options`` are :func:`train_sites`' keyword arguments (sizes, token counts, seed, ...).
    Then ``z`` SAEs get :func:`z_head_report` and ``v`` SAEs :func:`value_cluster_report`.

    Writes ``out/{site key}/`` per SAE (see the module docstring) and returns
    ``{"out", "config", "saes": {site key: {"path", "stats", ...}}}``.
    """
    return train_sites(model, data, dictionary_sites(site, layers), out=out, **options)


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


__all__ = [
    "TrainConfig",
    "dictionary_sites",
    "format_stats",
    "train_dictionaries",
    "train_sites",
]
