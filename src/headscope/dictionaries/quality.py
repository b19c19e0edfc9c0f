"""How good a layer's residual dictionary is, measured on held-out tokens."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayerQuality:
    """One layer's dictionary, measured on held-out tokens.

    explained_variance: 1 − Σ‖x − x̂‖² / Σ‖x − mean x‖²; mean_l0: active features per token;
    dead_fraction: features that never fire on the held-out rows; error_share: mean over random
    QK edges of the error rows' part of the attribution's absolute mass (see :func:`error_share`).
    """

    layer: int
    explained_variance: float
    mean_l0: float
    dead_fraction: float
    error_share: float | None
    n_edges: int
    train_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_share(
    session, basis, layer: int, texts: Sequence[list[int]], n_edges: int, seed: int = 0
) -> tuple[float, float]:
    """The error rows' share of QK attributions' absolute mass in ``basis`` at ``layer``.

    For ``n_edges`` random (head, query, key) edges of ``layer`` on ``texts`` (token ids, BOS
    first; keys after the BOS, which no dictionary is trained on), the attribution in the
    dictionary basis (:func:`headscope.analysis.attribution.side_vectors`, as the app computes
    it) is a matrix of (query row × key row) terms; the share is Σ|terms in the query's or the
    key's error row| / Σ|terms|. Returns (mean share, largest |Σ terms − score| / |score|
    — the check that the terms add up to the model's own score)."""
    from headscope.analysis.attribution import side_vectors

    s = session.adapter.spec
    rng = random.Random(seed * 7919 + layer)
    shares, worst = [], 0.0
    for _ in range(n_edges):
        ids = list(texts[rng.randrange(len(texts))])
        st = session.state(ids)
        head = rng.randrange(s.n_heads)
        query = rng.randrange(2, len(ids))
        key = rng.randrange(1, query + 1)
        q_labels, Q = side_vectors(session, st, layer, head, query, "q", basis)
        k_labels, K = side_vectors(session, st, layer, head, key, "k", basis)
        terms = (s.attn_scale * (Q @ K.T)).abs().cpu()  # [Cq, Ck]
        q_err = torch.tensor([lab.endswith("/error") for lab in q_labels])
        k_err = torch.tensor([lab.endswith("/error") for lab in k_labels])
        err = terms[q_err].sum() + terms[:, k_err].sum() - terms[q_err][:, k_err].sum()
        shares.append(float(err / terms.sum()))
        t = st.cap.layers[layer]
        kv = int(session.adapter.weights(layer).kv_of_head[head])
        score = float(s.attn_scale * (t.q[0, head, query].double() @ t.k[0, kv, key].double()))
        total = float((s.attn_scale * (Q @ K.T)).sum())
        worst = max(worst, abs(total - score) / max(abs(score), 1e-6))
    return (sum(shares) / len(shares) if shares else math.nan), worst


def format_quality(rows: Sequence[LayerQuality]) -> str:
    """The per-layer table: layer, explained variance, L0, dead, error share, seconds."""
    lines = ["layer  explained var.   L0     dead   error share  train s"]
    for r in rows:
        share = "n/a" if r.error_share is None else f"{r.error_share:.3f}"
        lines.append(
            f"L{r.layer:<5} {r.explained_variance:>13.4f} {r.mean_l0:>5.1f} "
            f"{r.dead_fraction:>7.1%} {share:>12} {r.seconds:>8.0f}"
        )
    return "\n".join(lines)
