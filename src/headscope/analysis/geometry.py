"""QK geometry (the HeadVis paper's country/city matrix): cosine similarity of mean-subtracted query
vectors of one prompt set against mean-subtracted key vectors of another, per head, beside the
same matrix in the residual stream at the head's layer input.

Each prompt marks its token as ``[[token]]``; the vector is taken at the last token overlapping
the mark. Query and key vectors are compared before RoPE (un-rotating the captured vectors), so
prompts of different lengths are comparable.
"""

from __future__ import annotations

import re

import torch

from headscope.analysis.batching import run_grouped
from headscope.analysis.inputs import parse_heads
from headscope.analysis.results import GeometryResult
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.limits import MAX_GEOMETRY_PROMPTS, MAX_GEOMETRY_VALUES
from headscope.model.spec import head_name

_MARK = re.compile(r"\[\[(.+?)\]\]")


def parse_marked(prompt: str) -> tuple[str, int, int, str]:
    """``"The country [[France]]"`` -> (text without brackets, span start, span end, token)."""
    marks = list(_MARK.finditer(prompt))
    if len(marks) != 1:
        raise InputError(f"prompt {prompt!r} must mark exactly one token as [[token]]")
    m = marks[0]
    text = prompt[: m.start()] + m.group(1) + prompt[m.end() :]
    return text, m.start(), m.start() + len(m.group(1)), m.group(1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [N, D], [M, D] -> [N, M]
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def _summary(cos: torch.Tensor, key_groups: list[int] | None = None) -> dict:
    """Diagonal vs off-diagonal means of a square matrix; with ``key_groups`` (the query each
    key belongs to, many keys to one query), own-group vs other-group means."""
    if key_groups is not None:
        own = torch.zeros_like(cos, dtype=torch.bool)
        own[torch.tensor(key_groups), torch.arange(cos.shape[1])] = True
        out = {"own_mean": float(cos[own].mean())}
        if (~own).any():
            out["other_mean"] = float(cos[~own].mean())
        return out
    if cos.shape[0] != cos.shape[1] or cos.shape[0] < 2:
        return {}
    diag = cos.diagonal()
    off = cos[~torch.eye(cos.shape[0], dtype=torch.bool)]
    return {"diag_mean": float(diag.mean()), "offdiag_mean": float(off.mean())}


def qk_geometry(
    session: Session,
    queries: list[str],
    keys: list[str],
    heads: list[str] | None,
    key_groups: list[int] | None = None,
) -> GeometryResult:
    """Per head: cosine matrix [len(queries), len(keys)] of mean-subtracted pre-RoPE q vs k.

    ``key_groups``: for grouped (many-to-one) sets, the index of the query each key belongs to
    (e.g. a city's country); each matrix then reports own-group and other-group means."""
    if key_groups is not None:
        if len(key_groups) != len(keys):
            raise InputError(f"{len(key_groups)} key groups for {len(keys)} keys")
        if any(not 0 <= g < len(queries) for g in key_groups):
            raise InputError(f"key groups must be query indices 0..{len(queries) - 1}")
    for name, prompts in (("queries", queries), ("keys", keys)):
        if not prompts:
            raise InputError(f"no {name} prompts")
        if len(prompts) > MAX_GEOMETRY_PROMPTS:
            raise InputError(f"{len(prompts)} {name} prompts; the limit is {MAX_GEOMETRY_PROMPTS}")
    pairs = parse_heads(session.adapter, heads)
    n_values = len(pairs) * len(queries) * len(keys)
    if n_values > MAX_GEOMETRY_VALUES:
        raise InputError(
            f"{n_values:,} cosine similarities (heads x queries x keys); the limit is "
            f"{MAX_GEOMETRY_VALUES:,}: ask for fewer heads"
        )
    ad = session.adapter
    layers = sorted({layer for layer, _ in pairs})
    prompts = [*queries, *keys]
    seqs, positions, labels = [], [], []
    for prompt in prompts:
        text, start, end, token = parse_marked(prompt)
        ids, span = ad.tokens.span_positions(text, start, end)
        if not span:
            raise InputError(f"the mark in {prompt!r} covers no token")
        if len(ids) > session.max_tokens:
            raise InputError(
                f"prompt {prompt[:40]!r}... is longer than {session.max_tokens} tokens"
            )
        seqs.append(ids)
        positions.append(span[-1])
        labels.append(token)
    s = ad.spec
    q_vecs = {layer: torch.zeros(len(prompts), s.n_heads, s.d_head) for layer in layers}
    k_vecs = {layer: torch.zeros(len(prompts), s.n_kv_heads, s.d_head) for layer in layers}
    resid = {layer: torch.zeros(len(prompts), s.d_model) for layer in layers}

    def handle(idx, cap):
        rows = torch.arange(len(idx))
        pos = torch.tensor([positions[i] for i in idx])
        for layer in layers:
            t = cap.layers[layer]
            q = t.q[rows, :, pos]  # [B, H, D]
            k = t.k[rows, :, pos]  # [B, KV, D]
            if layer in cap.rope:  # undo RoPE: rotating by -angle is the inverse
                cos, sin = cap.rope[layer]
                c, sn = cos[0, pos][:, None], sin[0, pos][:, None]  # default position ids
                q = ad.apply_rope(q, c, -sn, s.rotary_dim)
                k = ad.apply_rope(k, c, -sn, s.rotary_dim)
            q_vecs[layer][idx] = q.float()
            k_vecs[layer][idx] = k.float()
            resid[layer][idx] = cap.resid_pre[layer][rows, pos].float()

    run_grouped(ad, seqs, handle, layers=layers, patterns=False, residuals=True)
    nq = len(queries)
    out_heads = {}
    for layer, h in pairs:
        kv = int(ad.weights(layer).kv_of_head[h])
        cos = _cosine(q_vecs[layer][:nq, h], k_vecs[layer][nq:, kv])
        out_heads[head_name(layer, h)] = {
            "layer": layer,
            "cosine": cos.tolist(),
            **_summary(cos, key_groups),
        }
    by_layer = {}
    for layer in layers:
        cos = _cosine(resid[layer][:nq], resid[layer][nq:])
        by_layer[str(layer)] = {
            "layer": layer,
            "cosine": cos.tolist(),
            **_summary(cos, key_groups),
        }
    return GeometryResult.model_validate(
        {
            "query_labels": labels[:nq],
            "key_labels": labels[nq:],
            "heads": out_heads,
            "residual": by_layer[str(layers[0])],
            "residual_by_layer": by_layer,
        }
    )
