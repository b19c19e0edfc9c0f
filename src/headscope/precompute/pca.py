"""PCA of each head's Q, K and O activations on its strongest (query, key) pairs.

As in HeadVis: per head, keep the ``n_pairs`` (query, key) pairs of the whole dataset with the
largest attention-output norm ``A[q, k] * ||v_o[k]||``, where ``v_o[k]`` is key k's value
vector passed through the head's W_O. For each pair store the query vector ``q[q]``, the key
vector ``k[k]`` and the output vector ``o = A[q, k] * v_o[k]``; after the pass, run a PCA on
each of the three sets. Clusters in the first components hint that the head has distinct
behaviours.

Pairs are restricted to queries q >= 1 and keys ``1 <= k <= q`` (key 0, the attention sink,
is left out) at valid positions. Ties in norm are broken by (sequence, q_pos, k_pos), so the
selection does not depend on batch size or shard order, and shards merge exactly.

Each pair also keeps its context, so a point can be read without its sequence: the tokens from
``CONTEXT_BEFORE`` positions before to ``CONTEXT_AFTER`` after the query and the key.

Memory: ``L * H * n_pairs * (2 * d_head + d_out)`` values in ``dtype`` (float16 by default),
plus ``2 * CONTEXT`` token ids per pair.
``v_o`` may be given in any orthonormal basis of W_O[h]'s row space (``d_out = d_head``) instead
of the model basis: norms, PCA coordinates and variance ratios are unchanged (up to sign), and
the O table shrinks by ``d_model / d_head`` (9x for SmolLM2: 53 MB instead of 195 MB in all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.metrics.registry import LayerBatch
from headscope.metrics.rows import KEY_GROUP
from headscope.threads import single_threaded

_META = ("sequence", "q_pos", "k_pos", "query_token", "key_token")
CONTEXT_BEFORE, CONTEXT_AFTER = 6, 2  # tokens kept around each pair's query and key
CONTEXT = CONTEXT_BEFORE + 1 + CONTEXT_AFTER
_SEQ_BITS, _POS_BITS = 23, 20
_TINY = torch.finfo(torch.float32).tiny
# Above this vector width the exact covariance eigendecomposition gets expensive
# (d_model = 576: ~0.6 s per head on 2 cores), so PCA switches to a randomized range finder.
_EXACT_MAX_DIM = 128
_OVERSAMPLE = 8
_FIT_CHUNK = 32  # heads per batched PCA in fit()
_POWER_ITERS = 4


def orient_components(components: Tensor) -> Tensor:
    """Flip each component (rows of [..., k, F]) so its largest-|loading| entry is positive.

    PCA components are defined up to sign; this makes outputs deterministic.
    """
    idx = components.abs().argmax(-1, keepdim=True)  # [..., k, 1]
    sign = components.gather(-1, idx).sign()
    return components * torch.where(sign == 0, 1.0, sign).to(components.dtype)


def _pca(x: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Batched PCA. x: [G, N, d], mask: [G, N] bool -> (coords [G, N, k], variance_ratio [G, k]).

    Rows outside the mask get coordinate 0. Components are sign-fixed (largest |loading|
    positive). Exact (covariance eigendecomposition, float64) for d <= 128; above that a
    randomized range finder (Halko et al.: 8 extra dimensions, 4 power iterations, a fixed
    start matrix, so deterministic) followed by an exact SVD in that subspace; for the
    leading components this agrees with a full SVD to ~1e-5.
    """
    G, N, d = x.shape
    # float32 arithmetic (the stored vectors are float16), float64 for the small
    # decompositions and the total variance
    x = x.float()
    m = mask[..., None].float()  # [G, N, 1]
    cnt = m.sum(1, keepdim=True).clamp_min(1.0)  # [G, 1, 1]
    xc = (x - (x * m).sum(1, keepdim=True) / cnt) * m  # [G, N, d] centred, masked
    total = xc.square().sum((1, 2), dtype=torch.float64)  # [G]
    if d <= _EXACT_MAX_DIM:
        cov = (xc.mT @ xc).double()  # [G, d, d]
        with single_threaded():
            evals, evecs = torch.linalg.eigh(cov)  # ascending
        var = evals.flip(-1).clamp_min(0.0)  # [G, d]
        comps = evecs.flip(-1).mT  # [G, d, d] rows = components
    else:
        width = min(k + _OVERSAMPLE, N, d)
        gen = torch.Generator().manual_seed(0)
        omega = torch.randn(d, width, generator=gen)  # [d, l]
        # products written as (thin^T @ wide)^T: MKL is ~4x faster with the thin side first
        with single_threaded():
            basis = torch.linalg.qr((omega.T @ xc.mT).mT).Q  # [G, N, l]
            for _ in range(_POWER_ITERS):
                z = torch.linalg.qr((basis.mT @ xc).mT).Q  # [G, d, l]
                basis = torch.linalg.qr((z.mT @ xc.mT).mT).Q  # [G, N, l]
            _, s, comps = torch.linalg.svd((basis.mT @ xc).double(), full_matrices=False)
        var = s.square()  # comps: [G, l, d]
    r = min(k, comps.shape[1])
    top = orient_components(comps[:, :r]).float()  # [G, r, d]
    coords = x.new_zeros(G, N, k)
    coords[..., :r] = xc @ top.mT
    ratio = total.new_zeros(G, k)
    ratio[:, :r] = var[:, :r] / torch.where(total > 0, total, 1.0)[:, None]
    return coords, ratio


def _span(start: int, tokens: list[int]) -> dict:
    """One stretch of context with the positions outside the sequence (-1) cut off."""
    first = next((i for i, t in enumerate(tokens) if t >= 0), len(tokens))
    last = len(tokens)
    while last > first and tokens[last - 1] < 0:
        last -= 1
    return {"start": start + first, "tokens": tokens[first:last]}


def context_spans(q_pos: int, k_pos: int, q_window: list[int], k_window: list[int]) -> list[dict]:
    """The context of a pair as ``[{"start": position, "tokens": [ids]}, ...]``: from
    ``CONTEXT_BEFORE`` tokens before to ``CONTEXT_AFTER`` after the key, then the same around the
    query; one span when the two stretches overlap or touch."""
    k_start, q_start = k_pos - CONTEXT_BEFORE, q_pos - CONTEXT_BEFORE
    if q_start <= k_pos + CONTEXT_AFTER + 1:
        return [_span(k_start, k_window[: q_pos - k_pos] + q_window)]
    return [_span(k_start, k_window), _span(q_start, q_window)]


class PairCollector:
    """Streaming top-N (query, key) pairs per head by attention-output norm, with Q/K/O vectors."""

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        d_head: int,
        d_out: int,
        n_pairs: int = 512,
        dtype: torch.dtype = torch.float16,
    ):
        self.n_layers, self.n_heads, self.n_pairs = n_layers, n_heads, n_pairs
        self.d_head, self.d_out, self.dtype = d_head, d_out, dtype
        L, H, N = n_layers, n_heads, n_pairs
        self.norm = torch.full((L, H, N), float("-inf"))  # [L, H, N] float32, best first
        self.meta = torch.full((L, H, N, len(_META)), -1, dtype=torch.int64)  # [L, H, N, 5]
        self.q_vec = torch.zeros(L, H, N, d_head, dtype=dtype)  # [L, H, N, D]
        self.k_vec = torch.zeros(L, H, N, d_head, dtype=dtype)  # [L, H, N, D]
        self.o_vec = torch.zeros(L, H, N, d_out, dtype=dtype)  # [L, H, N, d_out]
        # [L, H, N, 2, C] token ids at q_pos - CONTEXT_BEFORE + j ([..., 0, j]) and at
        # k_pos - CONTEXT_BEFORE + j ([..., 1, j]); -1 outside the sequence
        self.window = torch.full((L, H, N, 2, CONTEXT), -1, dtype=torch.int32)
        self._buffer: Tensor | None = None  # scratch for pair norms, not part of the state

    def _candidates(
        self,
        layer: int,
        pattern: Tensor,
        v_norm: Tensor,
        valid: Tensor,
        group_max: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(sequence-in-batch, head, q, k, norm), each [M], of the pairs that can still enter
        their head's top N. pattern: [B, H, T, T] causal, or a block of its rows [B, H, r, S]
        (q is then the row in the block); v_norm: [B, H, S] (0 at key 0); valid: [B, r] the
        valid queries among the rows; group_max: [B, H, r, S // KEY_GROUP] row maxima per key
        group, if already computed."""
        B, H, T, S = pattern.shape
        N = self.n_pairs
        floor = self.norm[layer, :, -1].to(pattern.device)  # [H] N-th best so far, -inf until full
        if bool(torch.isfinite(floor).all()):
            # Only tiles (one query row, a group of W keys) whose best possible pair reaches
            # the floor are read: A[q, k] * ||v_o[k]|| <= (max over the group of A[q, .]) *
            # (max over the group of ||v_o||). Groups of keys make the bound tight: one large
            # value norm anywhere in the sequence no longer lets every row through.
            W = KEY_GROUP if S % KEY_GROUP == 0 else S
            G = S // W
            floor = floor.clamp_min(_TINY)  # zero pairs never count
            tiles_a = pattern.reshape(B, H, T, G, W)
            tiles_v = v_norm.reshape(B, H, G, W)
            a_max = tiles_a.amax(-1) if group_max is None else group_max  # [B, H, T, G]
            bound = a_max * tiles_v.amax(-1)[:, :, None, :]  # [B, H, T, G]
            bound.masked_fill_(~valid[:, None, :, None], 0.0)
            b, h, q, g = (bound >= floor[None, :, None, None]).nonzero(as_tuple=True)  # [R]
            tiles = tiles_a[b, h, q, g] * tiles_v[b, h, g]  # [R, W] pair norms of those tiles
            r, j = (tiles >= floor[h, None]).nonzero(as_tuple=True)
            b, h, q, k, norm = b[r], h[r], q[r], g[r] * W + j, tiles[r, j]
            # at most N per (sequence, head) can make the final top N: keep each group's N
            # best by (-norm, q, k); the list is already in (b, h, q, k) order
            by_norm = (-norm).argsort(stable=True)
            group = (b * H + h)[by_norm]
            order = by_norm[group.argsort(stable=True)]
            group = (b * H + h)[order]
            counts = torch.bincount(group, minlength=B * H)
            rank = (
                torch.arange(group.numel(), device=group.device)
                - (counts.cumsum(0) - counts)[group]
            )
            keep = order[rank < N]
            return b[keep], h[keep], q[keep], k[keep], norm[keep]
        # Filling up: every positive pair is a candidate, so read the whole pattern once and
        # cap each (sequence, head) at its own N best (plus ties).
        pair = torch.mul(pattern, v_norm[:, :, None, :], out=self._scratch_like(pattern))
        if not bool(valid.all()):
            pair.masked_fill_(~valid[:, None, :, None], 0.0)  # padding queries
        flat = pair.flatten(2)
        kth = flat.topk(min(N, flat.shape[-1]), dim=-1).values[..., -1]  # [B, H]
        threshold = torch.maximum(kth, floor.clamp_min(_TINY)[None])  # zero pairs never count
        b, h, q, k = (pair >= threshold[..., None, None]).nonzero(as_tuple=True)
        return b, h, q, k, pair[b, h, q, k]

    def _scratch_like(self, pattern: Tensor) -> Tensor:
        """A [B, H, T, T] buffer kept between calls: fresh 40 MB allocations are slow (blocks of
        rows of growing width share it)."""
        buf, n = self._buffer, pattern.numel()
        if buf is None or buf.numel() < n or buf.device != pattern.device:
            buf = self._buffer = torch.empty(n, device=pattern.device)
        return buf[:n].view(pattern.shape)

    def _best(self, norm: Tensor, meta: Tensor) -> Tensor:
        """norm: [..., M], meta: [..., M, 5] -> indices [..., N] of the best pairs, best first."""
        empty = meta[..., 0] < 0
        if (meta[..., 0] >= 2**_SEQ_BITS).any() or (meta[..., 1:3] >= 2**_POS_BITS).any():
            raise ValueError("sequence index or position too large for the tie-break key")
        primary = (-norm.double()).masked_fill(empty, float("inf"))
        secondary = (meta[..., 0] << (2 * _POS_BITS)) | (meta[..., 1] << _POS_BITS) | meta[..., 2]
        secondary = secondary.masked_fill(empty, torch.iinfo(torch.int64).max)
        order = secondary.argsort(dim=-1, stable=True)
        order = order.gather(-1, primary.gather(-1, order).argsort(dim=-1, stable=True))
        return order[..., : self.n_pairs]

    def _keep(
        self, layers: slice | int, norm: Tensor, meta: Tensor, window: Tensor, vecs: list[Tensor]
    ) -> None:
        """Keep the best n_pairs of the given candidates (already including the current ones)."""
        order = self._best(norm, meta)  # [..., N]
        self.norm[layers] = norm.gather(-1, order)
        self.meta[layers] = meta.gather(-2, order[..., None].expand(*order.shape, meta.shape[-1]))
        self.window[layers] = window.gather(
            -3, order[..., None, None].expand(*order.shape, 2, CONTEXT)
        )
        for name, v in zip(("q_vec", "k_vec", "o_vec"), vecs, strict=True):
            idx = order[..., None].expand(*order.shape, v.shape[-1])
            getattr(self, name)[layers] = v.gather(-2, idx)

    def update(self, batch: LayerBatch) -> None:
        """Offer every (query, key) pair of one layer batch.

        Reads the batch's pattern, tokens, valid positions, key-group row maxima
        (``batch.rows.group_max``) and its optional ``seq_idx``, ``q``, ``k`` (per query head,
        after any position encoding, i.e. what the dot product sees) and ``v_o`` (each key's
        value vector through W_O[h], ``d_out`` wide).
        """
        layer, pattern, tokens, valid = batch.layer, batch.pattern, batch.tokens, batch.valid
        seq_indices, q, k = batch.need("seq_idx"), batch.need("q"), batch.need("k")
        v_o = batch.need("v_o")
        group_max = batch.rows.group_max
        H = pattern.shape[1]
        dev = pattern.device
        s, S = batch.row_start, batch.row_stop  # a block of query rows sees keys < S
        v_norm = v_o[:, :, :S].float().norm(dim=-1)  # [B, H, S]
        v_norm[:, :, 0] = 0.0  # key 0, the attention sink, never forms a pair
        b, h, qi, ki, norms = self._candidates(layer, pattern, v_norm, valid[:, s:S], group_max)
        M = b.numel()
        if M == 0:
            return
        qi = qi + s  # query positions (the candidates' q are rows of the block)
        meta = torch.stack(
            [seq_indices.to(dev)[b], qi, ki, tokens[b, qi], tokens[b, ki]], -1
        ).cpu()  # [M, 5]
        # each sequence padded with -1 on both sides, so every window is one slice of it
        T = tokens.shape[1]
        padded_tokens = tokens.new_full((tokens.shape[0], T + CONTEXT), -1)
        padded_tokens[:, CONTEXT_BEFORE : CONTEXT_BEFORE + T] = tokens.masked_fill(~valid, -1)
        offsets = torch.arange(CONTEXT, device=dev)  # [C]
        window = torch.stack(
            [padded_tokens[b[:, None], pos[:, None] + offsets] for pos in (qi, ki)], 1
        ).to(device="cpu", dtype=torch.int32)  # [M, 2, C]
        weight = pattern[b, h, qi - s, ki]  # [M]
        cand_vecs = [q[b, h, qi], k[b, h, ki], weight[:, None] * v_o[b, h, ki]]
        norms = norms.float().cpu()

        # pad the flat candidate list into [H, Mmax] by head
        h = h.cpu()
        counts = torch.bincount(h, minlength=H)  # [H]
        mmax = int(counts.max())
        order = h.argsort(stable=True)
        hs = h[order]
        rank = torch.arange(M) - (counts.cumsum(0) - counts)[hs]
        c_norm = torch.full((H, mmax), float("-inf"))
        c_norm[hs, rank] = norms[order]
        c_meta = torch.full((H, mmax, len(_META)), -1, dtype=torch.int64)
        c_meta[hs, rank] = meta[order]
        c_window = torch.full((H, mmax, 2, CONTEXT), -1, dtype=torch.int32)
        c_window[hs, rank] = window[order]
        vecs = []
        for current, v in zip((self.q_vec, self.k_vec, self.o_vec), cand_vecs, strict=True):
            padded = torch.zeros(H, mmax, v.shape[-1], dtype=self.dtype)
            padded[hs, rank] = v.detach().cpu().to(self.dtype)[order]
            vecs.append(torch.cat([current[layer], padded], 1))
        self._keep(
            layer,
            torch.cat([self.norm[layer], c_norm], 1),
            torch.cat([self.meta[layer], c_meta], 1),
            torch.cat([self.window[layer], c_window], 1),
            vecs,
        )

    def merge(self, other: PairCollector) -> None:
        """Union with another shard's pairs (disjoint sequences), then keep the top N."""
        same = (self.n_layers, self.n_heads, self.n_pairs, self.d_head, self.d_out)
        if same != (other.n_layers, other.n_heads, other.n_pairs, other.d_head, other.d_out):
            raise ValueError("can only merge collectors with the same shape")
        self._keep(
            slice(None),
            torch.cat([self.norm, other.norm], -1),
            torch.cat([self.meta, other.meta], -2),
            torch.cat([self.window, other.window], -3),
            [
                torch.cat([getattr(self, n), getattr(other, n).to(self.dtype)], -2)
                for n in ("q_vec", "k_vec", "o_vec")
            ],
        )

    _STATE = ("norm", "meta", "window", "q_vec", "k_vec", "o_vec")

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only: ``norm`` [L, H, N], ``meta`` [L, H, N, 5] (sequence, q_pos, k_pos,
        query token, key token; -1 = empty), ``window`` [L, H, N, 2, C] (token ids around the
        query and the key), ``q_vec``/``k_vec`` [L, H, N, D], ``o_vec``."""
        return {name: getattr(self, name).clone() for name in self._STATE}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._STATE:
            current = getattr(self, name)
            if state[name].shape != current.shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}")
            setattr(self, name, state[name].to(current.dtype).clone())

    def fit(self, n_components: int = 3) -> dict[tuple[int, int], dict]:
        """(layer, head) -> ``{"q"|"k"|"o": {"coords": [[x, y, z], ...], "variance_ratio": [..]},
        "points": [{"sequence", "q_pos", "k_pos", "distance", "query_token", "key_token",
        "norm", "context"}, ...]}``; points best first, one per coordinate row. ``context``:
        spans ``{"start": position, "tokens": [ids]}`` around the key and the query (one span
        when they overlap), see :func:`context_spans`. JSON-ready lists."""
        L, H, N = self.norm.shape
        mask = (self.meta[..., 0] >= 0).view(L * H, N)
        fits = {}
        for name, table in (("q", self.q_vec), ("k", self.k_vec), ("o", self.o_vec)):
            flat = table.view(L * H, N, -1)
            # heads in chunks: a float64 copy of every head's O table at once would be ~0.6 GB
            parts = [
                _pca(flat[i : i + _FIT_CHUNK], mask[i : i + _FIT_CHUNK], n_components)
                for i in range(0, L * H, _FIT_CHUNK)
            ]
            coords = torch.cat([c for c, _ in parts]).view(L, H, N, -1)
            ratio = torch.cat([r for _, r in parts]).view(L, H, -1)
            fits[name] = (coords.tolist(), ratio.tolist())
        meta = self.meta.tolist()
        norms = self.norm.tolist()
        windows = self.window.tolist()
        counts = mask.view(L, H, N).sum(-1).tolist()
        out = {}
        for layer in range(L):
            for head in range(H):
                n = counts[layer][head]
                entry: dict = {
                    name: {
                        "coords": coords[layer][head][:n],
                        "variance_ratio": ratio[layer][head],
                    }
                    for name, (coords, ratio) in fits.items()
                }
                entry["points"] = [
                    {
                        "sequence": s,
                        "q_pos": qp,
                        "k_pos": kp,
                        "distance": qp - kp,
                        "query_token": qt,
                        "key_token": kt,
                        "norm": nv,
                        "context": context_spans(qp, kp, qw, kw),
                    }
                    for (s, qp, kp, qt, kt), nv, (qw, kw) in zip(
                        meta[layer][head][:n],
                        norms[layer][head][:n],
                        windows[layer][head][:n],
                        strict=True,
                    )
                ]
                out[(layer, head)] = entry
        return out
