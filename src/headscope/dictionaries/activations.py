"""Stream model activations for dictionary training, several layers per forward pass.

Sites: ``resid`` (the residual stream entering a layer), ``z`` (one layer's per-head attention
outputs before W_O, concatenated: ``[H * D]``), ``v`` (one or two layers' value vectors,
concatenated: ``[n_layers * KV * D]``). The forward pass stops after the deepest layer needed,
so early layers are cheap. The BOS position (an attention sink with an outsized norm) and
padding are left out of the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from headscope.model import ModelAdapter
from headscope.precompute.sequences import batched, iter_sequences, stack


def site_key(site: str, layers: tuple[int, ...]) -> str:
    return f"{site}_" + "+".join(f"L{layer}" for layer in layers)


def site_dim(adapter: ModelAdapter, site: str, layers: tuple[int, ...]) -> int:
    s = adapter.spec
    return {
        "resid": s.d_model,
        "z": s.n_heads * s.d_head,
        "v": len(layers) * s.n_kv_heads * s.d_head,
    }[site]


def capture_sites(
    adapter: ModelAdapter, ids: torch.Tensor, sites: list[tuple[str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """One forward pass of ``ids [B, T]`` -> ``{site key: [B, T, dim]}`` for every site.

    The pass stops once the deepest layer a site reads has run (a ``resid`` site at layer L
    needs only the layers before L)."""
    s = adapter.spec
    resid_layers = {layer for site, layers in sites if site == "resid" for layer in layers}
    attn_layers = {layer for site, layers in sites if site != "resid" for layer in layers}
    deepest = max([layer - 1 for layer in resid_layers] + list(attn_layers))
    cap = adapter.run(
        ids,
        layers=sorted(attn_layers),
        patterns=False,
        logits=False,
        resid_layers=resid_layers,
        stop_after=deepest,
    )
    got: dict[tuple[str, int], torch.Tensor] = {
        ("resid", layer): cap.resid_pre[layer] for layer in resid_layers
    }
    for layer, t in cap.layers.items():
        B, T = t.z.shape[:2]
        got[("z", layer)] = t.z.reshape(B, T, s.n_heads * s.d_head)
        got[("v", layer)] = t.v.transpose(1, 2).reshape(B, T, s.n_kv_heads * s.d_head)
    out = {}
    for site, layers in sites:
        out[site_key(site, layers)] = torch.cat([got[(site, layer)] for layer in layers], dim=-1)
    return out


def iter_activations(
    adapter: ModelAdapter,
    data: Path,
    sites: list[tuple[str, tuple[int, ...]]],
    *,
    n_tokens: int,
    seq_len: int = 256,
    batch_size: int = 8,
    text_field: str = "text",
    skip_sequences: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Rows ``{site key: [N, dim]}`` (float32) per batch, until ``n_tokens`` rows were given."""
    given = 0
    seqs = iter_sequences(adapter.tokens, data, seq_len, text_field=text_field)
    for _ in range(skip_sequences):
        next(seqs, None)
    for batch in batched(seqs, batch_size):
        packed = stack(batch, adapter.tokens.bos_id)
        keep = packed.valid.clone()
        keep[:, 0] = False
        acts = capture_sites(adapter, packed.ids, sites)
        rows = {k: v[keep].float() for k, v in acts.items()}
        n = next(iter(rows.values())).shape[0]
        if given + n > n_tokens:
            rows = {k: v[: n_tokens - given] for k, v in rows.items()}
        given += next(iter(rows.values())).shape[0]
        yield rows
        if given >= n_tokens:
            return
