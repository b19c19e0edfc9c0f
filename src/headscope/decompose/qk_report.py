"""What each QK feature does: its top (query, key) pairs in context and its top tokens per side.

A feature's *contribution* at a causal pair (t, s) is its term of the summed score:
``gq[t, f] · gk[s, f]`` (rank 1) or the dot product of its query and key vectors (rank r).
Features are ranked by their share of ``Σ |contribution|`` weighted by the head's actual
attention, so the features the head's real pattern leans on come first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.decompose.common import causal_mask
from headscope.decompose.data import LayerData
from headscope.decompose.qk import QKActivations, QKDiagonal
from headscope.decompose.qk_train import head_tensors
from headscope.decompose.results import QKFeature, QKPair, QKReport, QKStats, TokenScore
from headscope.model.spec import head_name
from headscope.model.tokens import Tokens

_CHUNK = 1 << 24  # contribution entries (B·F·T·T) computed at once


def _contributions(acts: QKActivations) -> Tensor:
    """``[F, B, T, T]`` every feature's score term at every pair of a batch."""
    if acts.vq is None or acts.vk is None:
        return acts.gq.permute(2, 0, 1)[..., None] * acts.gk.permute(2, 0, 1)[:, :, None, :]
    return torch.einsum("btfr,bsfr->fbts", acts.vq, acts.vk)


class _TokenMax:
    """Largest activation and active count per (distinct token, feature)."""

    def __init__(self, n_ids: int, n_features: int, device: torch.device) -> None:
        self.max = torch.zeros(n_ids, n_features, device=device)
        self.count = torch.zeros(n_ids, n_features, device=device)

    def update(self, ids: Tensor, acts: Tensor) -> None:
        """``ids [n]`` compact token indices, ``acts [n, F]``."""
        F = acts.shape[-1]
        self.max.scatter_reduce_(0, ids[:, None].expand(-1, F), acts, "amax")
        self.count.index_add_(0, ids, (acts > 0).float())

    def top(self, f: int, n: int, uniq: Tensor, tokens: Tokens | None) -> list[TokenScore]:
        vals, idx = self.max[:, f].topk(min(n, self.max.shape[0]))
        out = []
        for v, u in zip(vals.tolist(), idx.tolist(), strict=True):
            if v <= 0:
                break
            tid = int(uniq[u])
            out.append(
                TokenScore(
                    token=tokens.display(tid) if tokens is not None else str(tid),
                    id=tid,
                    value=v,
                    count=int(self.count[u, f]),
                )
            )
        return out


@torch.no_grad()
def qk_report(
    model: QKDiagonal,
    data: LayerData,
    stats: QKStats,
    *,
    tokens: Tokens | None = None,
    n_features: int = 16,
    n_pairs: int = 8,
    n_tokens: int = 8,
) -> QKReport:
    """The ``n_features`` most used QK features of ``model`` on ``data``, each with its top
    ``n_pairs`` (query, key) pairs and top ``n_tokens`` tokens per side (display strings from
    ``tokens`` when given, else ids)."""
    cfg = model.cfg
    F, T = cfg.n_features, data.n_ctx
    device = data.q.device
    keep = causal_mask(T, device, cfg.window)
    keep[0] = False  # row 0 attends to itself only
    uniq, inverse = torch.unique(data.ids, return_inverse=True)  # [U], [N, T]
    q_tok, k_tok = _TokenMax(len(uniq), F, device), _TokenMax(len(uniq), F, device)
    used = torch.zeros(F, dtype=torch.float64, device=device)
    q_on = torch.zeros(F, device=device)
    k_on = torch.zeros(F, device=device)
    best = torch.full((F, n_pairs), float("-inf"), device=device)
    where = torch.zeros(F, n_pairs, dtype=torch.long, device=device)  # flat (context, t, s)
    batch = max(1, _CHUNK // (F * T * T * max(1, cfg.rank)))
    for start in range(0, data.n_contexts, batch):
        part = data.select(slice(start, start + batch))
        q, k, A, _ = head_tensors(part, cfg.head)
        acts = model.activations(q, k)
        ids = inverse[start : start + batch, 1:].reshape(-1)
        q_tok.update(ids, acts.gq[:, 1:].reshape(-1, F))
        k_tok.update(ids, acts.gk[:, 1:].reshape(-1, F))
        q_on += (acts.gq[:, 1:] > 0).float().sum((0, 1))
        k_on += (acts.gk[:, 1:] > 0).float().sum((0, 1))
        C = _contributions(acts).masked_fill(~keep, 0.0)  # [F, B, T, T]
        used += (C.abs() * A[None]).sum((1, 2, 3)).double()
        vals, flat = C.reshape(F, -1).topk(min(n_pairs, C[0].numel()), dim=-1)
        both_v = torch.cat([best, vals], 1)
        both_w = torch.cat([where, flat + start * T * T], 1)
        top = both_v.topk(n_pairs, dim=-1).indices
        best, where = both_v.gather(1, top), both_w.gather(1, top)
    share = used / used.sum().clamp_min(1e-30)
    n_tok = max(1, data.n_tokens)
    features = []
    for f in share.topk(min(n_features, F)).indices.tolist():
        pairs = []
        for v, w in zip(best[f].tolist(), where[f].tolist(), strict=True):
            if v <= 0:
                break
            c, rest = divmod(w, T * T)
            t, s = divmod(rest, T)
            qt, kt = int(data.ids[c, t]), int(data.ids[c, s])
            pairs.append(
                QKPair(
                    context=c,
                    query=t,
                    key=s,
                    query_token=tokens.display(qt) if tokens is not None else str(qt),
                    key_token=tokens.display(kt) if tokens is not None else str(kt),
                    value=v,
                )
            )
        features.append(
            QKFeature(
                feature=f,
                share=float(share[f]),
                query_density=float(q_on[f]) / n_tok,
                key_density=float(k_on[f]) / n_tok,
                pairs=pairs,
                query_tokens=q_tok.top(f, n_tokens, uniq, tokens),
                key_tokens=k_tok.top(f, n_tokens, uniq, tokens),
            )
        )
    return QKReport(head=head_name(cfg.layer, cfg.head), stats=stats, features=features)


def format_qk_features(report: QKReport, n: int = 8) -> str:
    """The first ``n`` features of a report, one paragraph each."""
    lines = [f"QK features of {report.head} (by share of attended score):"]
    for feat in report.features[:n]:
        qt = " ".join(repr(t.token) for t in feat.query_tokens[:6])
        kt = " ".join(repr(t.token) for t in feat.key_tokens[:6])
        pairs = ", ".join(f"{p.query_token!r}->{p.key_token!r}" for p in feat.pairs[:4])
        lines.append(
            f"  F{feat.feature:<4} share {feat.share:.3f}  density q {feat.query_density:.3f} "
            f"k {feat.key_density:.3f}\n      query tokens: {qt}\n      key tokens:   {kt}\n"
            f"      top pairs:    {pairs}"
        )
    return "\n".join(lines)
