"""Cluster SAE features by how much of each feature each attention head writes.

"Progress on Attention" (Jermyn et al. 2025) gives every feature of an SAE trained on the
concatenated per-head vectors (hook_z or hook_v, one or more layers) a head-loading vector —
the norm of each head's slice of its decoder vector — clusters these with k-means over a sweep of
k, and reads the distribution of cluster sizes (a smooth power law there, not two populations).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import torch

from headscope.files import write_text


def head_loadings(W_dec: torch.Tensor | np.ndarray, n_heads: int, d_head: int) -> np.ndarray:
    """[d_sae, n_layers·n_heads·d_head] decoder -> [d_sae, n_layers·n_heads] head loadings.

    The decoder's input dim must be head-major as TransformerLens flattens ``hook_z``/``hook_v``
    (``(layer,) head, d_head``), so column ``j`` is head ``j % n_heads`` of the ``j // n_heads``-th
    layer the SAE reads. Each entry is the L2 norm of that head's slice of the feature's decoder
    vector, divided by the feature's sum over heads (rows sum to 1; an all-zero row stays 0).
    """
    w = (
        W_dec.detach().cpu().double().numpy()
        if isinstance(W_dec, torch.Tensor)
        else np.asarray(W_dec, dtype=np.float64)
    )
    if w.ndim != 2:
        raise ValueError(f"W_dec must be [d_sae, d_in], got shape {list(w.shape)}")
    d_sae, width = w.shape
    if n_heads <= 0 or d_head <= 0 or width % (n_heads * d_head):
        raise ValueError(
            f"W_dec width {width} is not a multiple of n_heads·d_head = {n_heads}·{d_head}"
        )
    norms = np.linalg.norm(w.reshape(d_sae, width // d_head, d_head), axis=-1)  # [d_sae, n_slices]
    totals = norms.sum(axis=1, keepdims=True)  # [d_sae, 1]
    out = np.divide(norms, totals, out=np.zeros_like(norms), where=totals > 0)
    return out.astype(np.float32)


def head_names(layers: Sequence[int], n_heads: int) -> list[str]:
    """``L{layer}H{head}`` labels of :func:`head_loadings` columns for an SAE reading ``layers``."""
    return [f"L{layer}H{head}" for layer in layers for head in range(n_heads)]


def kmeans_sweep(
    loadings: np.ndarray | torch.Tensor,
    ks: Iterable[int] = (2, 4, 8, 16, 32),
    *,
    seed: int = 0,
    n_init: int = 4,
) -> dict[int, dict[str, Any]]:
    """k-means of [d_sae, n_heads] loadings for each k -> {k: {"sizes", "inertia"}}.

    ``sizes`` lists the cluster sizes largest first; ``inertia`` is the within-cluster sum of
    squared distances. Deterministic for a given seed (fixed ``n_init`` and ``random_state``).
    """
    from sklearn.cluster import KMeans  # deferred: scikit-learn is slow to import

    x = (
        loadings.detach().cpu().numpy()
        if isinstance(loadings, torch.Tensor)
        else np.asarray(loadings)
    )
    x = x.astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"loadings must be [d_sae, n_heads], got shape {list(x.shape)}")
    out: dict[int, dict[str, Any]] = {}
    for k in ks:
        if not 1 <= k <= len(x):
            raise ValueError(f"k={k} needs 1 <= k <= number of features ({len(x)})")
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
        sizes = np.bincount(km.labels_, minlength=k)
        out[int(k)] = {
            "sizes": sorted((int(s) for s in sizes), reverse=True),
            "inertia": float(km.inertia_),
        }
    return out


_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between lo and hi (both > 0); only powers of ten when the range is wide."""
    mults = (1, 2, 5) if hi / lo < 1e3 else (1,)
    ticks = []
    for exp in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1):
        ticks += [m * 10.0**exp for m in mults if lo <= m * 10.0**exp <= hi]
    return ticks


def plot_cluster_sizes(
    sweep: Mapping[int, Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "k-means cluster sizes of head loadings",
) -> Path:
    """Write an SVG of cluster size vs rank (log-log), one series per k, from :func:`kmeans_sweep`.

    A power law shows as a straight line. Standalone SVG, no plotting library.
    """
    series = {
        int(k): [s for s in v["sizes"] if s > 0]
        for k, v in sorted(sweep.items(), key=lambda kv: int(kv[0]))
    }
    series = {k: sizes for k, sizes in series.items() if sizes}
    if not series:
        raise ValueError("sweep has no non-empty clusters to plot")
    width, height = 640, 420
    left, right, top, bottom = 70, 110, 40, 55
    x_hi = max(2.0, max(len(s) for s in series.values()))
    y_lo = min(min(s) for s in series.values())
    y_hi = max(max(s) for s in series.values())
    y_lo, y_hi = (y_lo / 2, y_hi * 2) if y_lo == y_hi else (y_lo, y_hi)
    # Pad both log ranges so the extreme points do not sit on the axes or the plot's top edge.
    x_pad, y_pad = x_hi**0.04, (y_hi / y_lo) ** 0.06
    x0, x1, y0, y1 = 1 / x_pad, x_hi * x_pad, y_lo / y_pad, y_hi * y_pad

    def px(rank: float) -> float:
        return left + (width - left - right) * np.log(rank / x0) / np.log(x1 / x0)

    def py(size: float) -> float:
        return height - bottom - (height - top - bottom) * np.log(size / y0) / np.log(y1 / y0)

    el = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
    ]
    for t in _log_ticks(1, x_hi):
        x = px(t)
        el.append(
            f'<line x1="{x:.1f}" y1="{height - bottom}" x2="{x:.1f}" y2="{height - bottom + 5}" stroke="black"/>'
        )
        el.append(f'<text x="{x:.1f}" y="{height - bottom + 18}" text-anchor="middle">{t:g}</text>')
    for t in _log_ticks(y_lo, y_hi):
        y = py(t)
        el.append(f'<line x1="{left - 5}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="black"/>')
        el.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>'
        )
        el.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    el.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 12}" text-anchor="middle">'
        "cluster rank (largest first, log)</text>"
    )
    el.append(
        f'<text x="18" y="{(top + height - bottom) / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 18 {(top + height - bottom) / 2:.1f})">features in cluster (log)</text>'
    )
    for i, (k, sizes) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        points = [(px(r), py(s)) for r, s in enumerate(sizes, start=1)]
        el.append(
            f'<polyline class="series" data-k="{k}" fill="none" stroke="{color}" stroke-width="1.5" '
            f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>'
        )
        el += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in points]
        ly = top + 16 * i + 8
        el.append(
            f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
        )
        el.append(f'<text x="{width - right + 38}" y="{ly + 4}">k = {k}</text>')
    el.append("</svg>")
    path = Path(path)
    write_text(path, "\n".join(el) + "\n")
    return path
