"""Head-loading cluster sizes of attention value SAEs beside the MTC's ("Progress on Attention").

The paper trains SAEs on the concatenated value vectors of a layer's heads (one layer, and two
layers together), gives each feature a head-loading vector, "the norm of the decoder vector
(per head)", clusters these vectors with k-means over k spanning orders of magnitude, and
compares the cluster-size distribution with that of a single-layer MTC's head loadings (both a
smooth power law there). :func:`compare_loading_clusters` does the same on one layer:

* a value SAE on layer L's values and one on layers L-1 and L together (TopK, trained here on
  the same contexts; held-out contexts for FVE and for which features are live);
* loadings per value head, exactly as the paper defines them (columns ``L{l}KV{j}``); in a
  grouped-query model the value heads are fewer than the query heads, so each set is also read
  through every query head's OV map: ``‖W_dec[f, kv(h)] W_O[h]‖`` per query head (columns
  ``L{l}H{h}``), the space the MTC's loadings live in;
* the same k-means cluster-size summary for the MTC's head loadings (``|loading|`` over the
  layer's query heads + identity) when an MTC is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from headscope.decompose.common import Log, no_log
from headscope.decompose.mtc import MTC
from headscope.decompose.mtc_train import loading_clusters
from headscope.decompose.results import LoadingClusterComparison, LoadingClusters
from headscope.dictionaries.activations import capture_sites, site_key
from headscope.dictionaries.clusters import head_loadings
from headscope.dictionaries.sae import SAE, SAEConfig
from headscope.dictionaries.train import train_saes
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.model.spec import head_name

DEFAULT_KS: tuple[int, ...] = (2, 8, 32, 128)


@dataclass(frozen=True)
class ValueRows:
    """Rows (one per token, BOS positions left out) captured for the comparison."""

    values: dict[tuple[int, ...], Tensor]  # layers -> [n, len(layers) · KV · D]
    resid: Tensor  # [n, d] residual entering the last layer (what an MTC encodes)


@torch.no_grad()
def capture_values(
    adapter: ModelAdapter, ids: Tensor, layer_sets: list[tuple[int, ...]], batch_size: int = 8
) -> ValueRows:
    """``ids [N, T]`` (BOS at 0) -> the concatenated values of each layer set and the residual
    entering the deepest layer, one forward pass per batch (stopping after that layer)."""
    last = max(max(s) for s in layer_sets)
    sites = [("v", s) for s in layer_sets] + [("resid", (last,))]
    parts: dict[str, list[Tensor]] = {site_key(*s): [] for s in sites}
    for start in range(0, ids.shape[0], batch_size):
        got = capture_sites(adapter, ids[start : start + batch_size], sites)
        for key, t in got.items():
            parts[key].append(t[:, 1:].reshape(-1, t.shape[-1]).float().cpu())  # [B·(T-1), dim]
    return ValueRows(
        values={s: torch.cat(parts[site_key("v", s)]) for s in layer_sets},
        resid=torch.cat(parts[site_key("resid", (last,))]),
    )


def _stream(
    eval_rows: dict[str, Tensor], train_rows: dict[str, Tensor], epochs: int, seed: int
) -> Iterator[dict[str, Tensor]]:
    """The held-out rows first (``train_saes`` keeps its first ``n_eval`` rows out of
    training), then ``epochs`` shuffled passes over the training rows."""
    yield eval_rows
    n = next(iter(train_rows.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        yield {k: v[order] for k, v in train_rows.items()}


def ov_loadings(
    W_dec: Tensor, W_O: Tensor, n_kv: int
) -> Tensor:  # [F, nL·KV·D], [nL, H, D, d] -> [F, nL·H]
    """Each feature's decoder slice for head h's value head read through h's ``W_O``:
    ``‖W_dec[f, kv(h)] W_O[h]‖`` per query head, rows over their sum."""
    nL, H, D, _ = W_O.shape
    dec = W_dec.reshape(W_dec.shape[0], nL, n_kv, D)  # [F, nL, KV, D]
    kv_of = torch.arange(H, device=W_dec.device) // (H // n_kv)  # [H]
    out = torch.einsum("flhe,lhed->flhd", dec[:, :, kv_of], W_O).norm(dim=-1)  # [F, nL, H]
    out = out.reshape(W_dec.shape[0], nL * H)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def loglog_slopes(clusters: list) -> dict[int, float]:
    """k -> least-squares slope of log(size) against log(rank), for k >= 3 non-empty sizes."""
    out = {}
    for c in clusters:
        s = np.asarray([x for x in c.sizes if x > 0], dtype=np.float64)
        if len(s) >= 3:
            rank = np.arange(1, len(s) + 1, dtype=np.float64)
            out[c.k] = float(np.polyfit(np.log(rank), np.log(s), 1)[0])
    return out


def _set(
    name: str,
    source: str,
    layers: list[int],
    columns: list[str],
    loads: Tensor,  # [F_live, C]
    n_features: int,
    ks: tuple[int, ...],
    seed: int,
    **stats: float,
) -> LoadingClusters:
    clusters = loading_clusters(loads.double().cpu(), ks, seed=seed)
    return LoadingClusters(
        name=name,
        source=source,
        layers=layers,
        columns=columns,
        n_features=n_features,
        n_live=int(loads.shape[0]),
        clusters=clusters,
        loglog_slope=loglog_slopes(clusters),
        **stats,
    )


@torch.no_grad()
def _live(sae: SAE, rows: Tensor, batch: int = 4096) -> Tensor:
    """``[F]`` bool: features active on some row of ``rows [n, d_in]``."""
    ever = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, rows.shape[0], batch):
        ever |= (sae.encode(rows[start : start + batch]) > 0).any(0).cpu()
    return ever


def compare_loading_clusters(
    adapter: ModelAdapter,
    ids: Tensor,  # [N, T] long, BOS at 0
    layer: int,
    *,
    n_eval: int = 16,
    n_features: int = 512,
    k: int = 16,
    epochs: int = 20,
    two_layer: bool = True,
    ks: tuple[int, ...] = DEFAULT_KS,
    mtc: MTC | None = None,
    batch_size: int = 512,
    lr: float | None = None,
    seed: int = 0,
    log: Log = no_log,
) -> LoadingClusterComparison:
    """Train value SAEs (``n_features`` wide, TopK ``k``) on ``layer`` (and on ``layer - 1`` with
    ``layer`` when ``two_layer``) over the first ``N - n_eval`` contexts, and report the k-means
    cluster sizes of their head loadings, live features only (active on the last ``n_eval``
    contexts), beside those of ``mtc``'s head loadings (live on the same contexts)."""
    s = adapter.spec
    if not 0 <= layer < s.n_layers:
        raise InputError(f"layer must be in 0..{s.n_layers - 1}, got {layer}")
    if not 0 < n_eval < ids.shape[0]:
        raise InputError(f"n_eval must be in 1..{ids.shape[0] - 1}, got {n_eval}")
    if mtc is not None and (mtc.cfg.layer != layer or mtc.cfg.d_model != s.d_model):
        raise InputError(f"the MTC is for layer {mtc.cfg.layer}, not layer {layer} of this model")
    t0 = time.perf_counter()
    layer_sets: list[tuple[int, ...]] = [(layer,)] + (
        [(layer - 1, layer)] if two_layer and layer > 0 else []
    )
    cut = ids.shape[0] - n_eval
    log(f"capturing values of {layer_sets} on {ids.shape[0]} contexts")
    train_rows, eval_rows = (
        capture_values(adapter, ids[:cut], layer_sets),
        capture_values(adapter, ids[cut:], layer_sets),
    )
    names = {ls: "+".join(f"L{x}" for x in ls) for ls in layer_sets}
    cfgs = {
        names[ls]: SAEConfig(
            d_in=len(ls) * s.n_kv_heads * s.d_head,
            d_sae=n_features,
            k=k,
            site="v",
            layers=ls,
            model_name=adapter.name,
            normalize_activations="expected_average_only_in",
            extra={"n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads},
        )
        for ls in layer_sets
    }
    n_train = train_rows.resid.shape[0]
    saes, stats = train_saes(
        _stream(
            {names[ls]: eval_rows.values[ls] for ls in layer_sets},
            {names[ls]: train_rows.values[ls] for ls in layer_sets},
            epochs,
            seed,
        ),
        cfgs,
        n_tokens=n_train * epochs,
        lr=lr,
        batch_size=batch_size,
        n_eval=eval_rows.resid.shape[0],
        buffer_size=max(batch_size, min(n_train, 2**16)),
        seed=seed,
        log=log,
        log_every=max(1, n_train * epochs // batch_size // 4),
    )
    sets: list[LoadingClusters] = []
    if mtc is not None:
        live = (mtc.encode(eval_rows.resid.to(mtc.W_enc.device)) > 0).any(0).cpu()  # [F]
        H = mtc.cfg.n_heads
        sets.append(
            _set(
                f"MTC head loadings, layer {layer} (query heads + identity)",
                "mtc",
                [layer],
                [head_name(layer, h) for h in range(H)] + ["identity"],
                mtc.head_loadings().cpu()[live],
                mtc.cfg.n_features,
                ks,
                seed,
            )
        )
    for ls in layer_sets:
        name = names[ls]
        sae, st = saes[name], stats[name]
        live = _live(sae, eval_rows.values[ls])
        W_dec = sae.W_dec.detach().cpu()[live]  # [F_live, nL·KV·D]
        what = f"value SAE on {' and '.join(f'layer {x}' for x in ls)}"
        extra = {"l0": float(st.mean_l0 or 0.0), "fve": float(st.explained_variance or 0.0)}
        kv = torch.from_numpy(head_loadings(W_dec, n_heads=s.n_kv_heads, d_head=s.d_head))
        sets.append(
            _set(
                f"{what}: decoder norm per value head",
                "value_sae",
                list(ls),
                [f"L{x}KV{j}" for x in ls for j in range(s.n_kv_heads)],
                kv,
                n_features,
                ks,
                seed,
                **extra,
            )
        )
        if s.n_kv_heads < s.n_heads:
            W_O = torch.stack([adapter.weights(x).W_O.float().cpu() for x in ls])  # [nL, H, D, d]
            sets.append(
                _set(
                    f"{what}: read through each query head's OV map",
                    "value_sae",
                    list(ls),
                    [head_name(x, h) for x in ls for h in range(s.n_heads)],
                    ov_loadings(W_dec, W_O, s.n_kv_heads),
                    n_features,
                    ks,
                    seed,
                    **extra,
                )
            )
    return LoadingClusterComparison(
        layer=layer,
        ks=sorted(ks),
        sets=sets,
        train_tokens=n_train,
        eval_tokens=int(eval_rows.resid.shape[0]),
        seconds=time.perf_counter() - t0,
    )


def format_loading_clusters(c: LoadingClusterComparison, width: int = 10) -> str:
    """Cluster sizes per set and k (largest ``width`` first), with the log-log slope."""
    lines = [
        f"k-means cluster sizes of head loadings, layer {c.layer} ({c.train_tokens:,} train / "
        f"{c.eval_tokens:,} held-out tokens; {c.seconds:.0f} s)"
    ]
    for st in c.sets:
        extra = "" if st.fve is None else f", L0 {st.l0:.1f}, FVE {st.fve:.3f}"
        lines.append(
            f"{st.name}: {st.n_live} of {st.n_features} features live, "
            f"{len(st.columns)} columns{extra}"
        )
        for cl in st.clusters:
            sizes = ", ".join(str(x) for x in cl.sizes[:width])
            more = " ..." if len(cl.sizes) > width else ""
            slope = st.loglog_slope.get(cl.k)
            tail = "" if slope is None else f"  (log-log slope {slope:.2f})"
            lines.append(f"  k={cl.k:<4} {sizes}{more}{tail}")
    return "\n".join(lines)
