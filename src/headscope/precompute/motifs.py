"""Pattern motifs: hand-made features of attention patterns, their embedding, and head distances.

Following Ivanitskiy et al., "Motifs in Attention Patterns of Large Language Models": every
(head, sequence) pattern gets a fixed vector of hand-made features (:data:`MOTIF_FEATURE_NAMES`),
a normaliser + PCA (:class:`MotifEmbedder`) maps it to 16 dimensions, and the distance between
two heads is the mean over sequences of the distance between their embeddings on the same
sequence (:func:`head_distances`). :func:`head_map` and :func:`nearest_heads` turn that into
the 2-D maps and neighbour lists of ``motifs/map.json``.

**Which part of the pattern.** Features are computed on the top-left ``n x n`` block with
``n = min(T, MOTIF_BLOCK) = 128``. Because attention is causal, that block is exactly the
pattern the model produces on the sequence's first 128 tokens, so it is a valid pattern in its
own right (rows sum to 1) and the features mean the same thing for every model and run. The
three Gram matrices are the expensive part (``n^3`` per head and sequence, ~64x more at
n = 512 than at 128); they are built from every other row (or key) 1, 3, 5, ..., whose entry
statistics estimate the full block's at a quarter of the cost. Row 0 (which can only attend
to itself) and padding rows are left out of every statistic. Position 0 (the attention sink) has its own features (the first column) and is left
out of the others (row maxima, distance profile, the key-side and skewed Gram matrices).

**Features**, per pattern, in this order (``stats`` = mean, std, q10, median, q90, max over
rows 1..n-1):

* ``diag.*``: stats of the diagonal ``A[q, q]``.
* ``first_col.*``: stats of the first column ``A[q, 0]``.
* ``sub{o}.*`` for o = 1..4: stats of the sub-diagonal ``A[q, q - o]`` (rows ``q > o``).
* ``row_max.*``: stats of each row's maximum over keys 1..q.
* ``entropy_norm.*``: stats of each row's entropy divided by ``log(q + 1)`` (1 = uniform);
  ``entropy.mean``: mean entropy in nats.
* ``dist.{d}`` for d = 5..16: the distance profile, mean of ``A[q, q - d]`` over rows
  ``q > d`` (offsets 0..4 are the means of ``diag`` and ``sub{o}``).
* ``tail.mid``, ``tail.far``: mean attention mass at distances 17..63 and >= 64 (key 0 left
  out); ``tail.rel_distance``: mean of ``sum_k A[q, k] (q - k) / q``.
* ``gram_rows.*`` (rows of A: vertical bars), ``gram_keys.*`` (columns of A without key 0:
  horizontal bars) and ``gram_skew.*`` (rows of the skewed pattern ``S[q, d] = A[q, q - d]``
  without key 0: "same offset in every row"): mean and std of the Gram diagonal, mean and std
  of its off-diagonal entries, mean and std of the off-diagonal cosine similarities, and the
  trace fraction ``trace(G) / sum(G)``.

Statistics of empty sets (e.g. a sequence with one valid token) are 0.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from headscope.files import write_tensors
from headscope.metrics.registry import LayerBatch
from headscope.precompute.pca import orient_components
from headscope.threads import single_threaded

MOTIF_BLOCK = 128
_GRAM_STRIDE = 2
_MIN_BLOCK = 5  # sub-diagonals 1..4 need five positions
EMBED_DIM = 16
_STATS = ("mean", "std", "q10", "q50", "q90", "max")
_ROW_GROUPS = ("diag", "first_col", "sub1", "sub2", "sub3", "sub4", "row_max", "entropy_norm")
_PROFILE = tuple(range(5, 17))
_MID, _FAR = 17, 64
_GRAM_STATS = ("diag_mean", "diag_std", "off_mean", "off_std", "cos_mean", "cos_std", "trace_frac")
_GRAMS = ("gram_rows", "gram_keys", "gram_skew")

MOTIF_FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"{g}.{s}" for g in _ROW_GROUPS for s in _STATS)
    + ("entropy.mean",)
    + tuple(f"dist.{d}" for d in _PROFILE)
    + ("tail.mid", "tail.far", "tail.rel_distance")
    + tuple(f"{g}.{s}" for g in _GRAMS for s in _GRAM_STATS)
)
_FORMAT = "headscope.motif-embedder/1"


@functools.lru_cache(maxsize=8)
def _block_constants(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant tensors of an n-block: positions [n], skew index [n, n], d < q mask [n, n],
    quantile levels [3]."""
    pos = torch.arange(n, device=device)
    q, d = pos[:, None], pos[None, :]
    skew_index = (q - d).clamp_min(0)  # S[q, d] = A[q, q - d]
    levels = torch.tensor([0.1, 0.5, 0.9], device=device)
    return pos, skew_index, d < q, levels


def _sorted(x: Tensor) -> Tensor:
    """Sort along the last dim. On CPU via NumPy: torch's CPU sort, which always builds
    indices, is ~30x slower on these short rows."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return x.sort(dim=-1).values


def _masked_stats(x: Tensor, mask: Tensor, levels: Tensor) -> Tensor:
    """x: [..., n], mask: [..., n] bool (broadcastable) -> [..., 6] (mean, std, q10/50/90, max).

    Quantiles interpolate linearly between order statistics, like ``torch.quantile``.
    """
    x, mask = torch.broadcast_tensors(x, mask)
    count = mask.sum(-1, keepdim=True)  # [..., 1]
    c = count.clamp_min(1).to(x.dtype)
    kept = torch.where(mask, x, 0.0)
    mean = kept.sum(-1, keepdim=True) / c
    var = (kept.square().sum(-1, keepdim=True) / c - mean.square()).clamp_min(0.0)
    ordered = _sorted(x.masked_fill(~mask, float("inf")))  # valid values first
    last = (count - 1).clamp_min(0)  # [..., 1]
    where = last.to(x.dtype) * levels  # [..., 3]
    lo = where.long()
    frac = where - lo
    quant = torch.lerp(
        ordered.gather(-1, lo), ordered.gather(-1, torch.minimum(lo + 1, last)), frac
    )
    out = torch.cat([mean, var.sqrt(), quant, ordered.gather(-1, last)], dim=-1)
    return out.masked_fill_(count == 0, 0.0)


def _gram_stats(x: Tensor, mask: Tensor) -> Tensor:
    """Statistics of the Gram matrix ``G = x x^T`` of the rows of x.

    x: [G, m, p] (rows outside the mask must be zero), mask: [G, m] bool -> [G, 7]. Sums of
    entries come from row sums (``sum(G) = ||sum_i x_i||^2``) and only the sums of squares
    need G itself, so no [G, m, m] masks are built.
    """
    g = x @ x.mT  # [G, m, m]
    diag = g.diagonal(dim1=-2, dim2=-1)  # [G, m]
    n = mask.sum(-1).to(x.dtype)  # [G]
    diag_sum = diag.sum(-1)
    diag_sq = diag.square().sum(-1)
    total = x.sum(1).square().sum(-1)  # [G] sum of all entries of G
    g_sq = torch.linalg.vector_norm(g, dim=(-2, -1)).square()

    nonzero = diag > 0
    inv = diag.clamp_min(1e-30).rsqrt().masked_fill_(~nonzero, 0.0)  # [G, m]
    n_nz = nonzero.sum(-1).to(x.dtype)  # rows with a defined cosine
    cos_total = (inv[:, None, :] @ x).square().sum((-2, -1))  # ||sum_i x_i / |x_i| ||^2
    g.mul_(inv[:, :, None]).mul_(inv[:, None, :])  # g is now the cosine-similarity matrix
    cos_sq = torch.linalg.vector_norm(g, dim=(-2, -1)).square()

    sums = torch.stack([diag_sum, total - diag_sum, cos_total - n_nz])  # [3, G]
    squares = torch.stack([diag_sq, g_sq - diag_sq, cos_sq - n_nz])
    counts = torch.stack([n, n * (n - 1), n_nz * (n_nz - 1)]).clamp_min(1.0)
    mean = sums / counts
    std = (squares / counts - mean.square()).clamp_min(0.0).sqrt()
    frac = diag_sum / torch.where(total > 0, total, 1.0)
    return torch.stack([mean[0], std[0], mean[1], std[1], mean[2], std[2], frac], dim=-1)


def motif_features(pattern: Tensor, valid: Tensor) -> Tensor:
    """Hand-made motif features of every (sequence, head) pattern.

    pattern: [B, H, T, T] causal attention; valid: [B, T] bool -> [B, H, F] float32 with
    F = ``len(MOTIF_FEATURE_NAMES)``, computed on the top-left ``min(T, 128)`` block.
    """
    B, H, T, _ = pattern.shape
    if T < _MIN_BLOCK:  # tiny sequences: append padding positions so every feature exists
        pad = _MIN_BLOCK - T
        pattern = torch.nn.functional.pad(pattern, (0, pad, 0, pad))
        valid = torch.cat([valid, valid.new_zeros(B, pad)], dim=1)
        T = _MIN_BLOCK
    n = min(T, MOTIF_BLOCK)
    pos, skew_index, skew_ok, levels = _block_constants(n, pattern.device)
    rows = valid[:, :n] & (pos >= 1)  # [B, n] rows that count
    rmask = rows[:, None, :]  # [B, 1, n]
    # [B, H, n, n]; row 0 and padding rows zeroed so they add nothing to column sums or Gram
    # matrices (where() also drops whatever padding rows hold, NaN included)
    if bool(valid[:, :n].all()):  # the common case, ~5x cheaper than where()
        a = pattern[:, :, :n, :n].to(torch.float32, copy=True)
        a[:, :, 0] = 0.0
    else:
        a = torch.where(rmask[..., None], pattern[:, :, :n, :n].float(), 0.0)
    # skewed pattern without key 0: S[q, d] = A[q, q - d] for d < q, else 0
    skew = a.gather(-1, skew_index.expand(B, H, n, n)).masked_fill_(~skew_ok, 0.0)

    ent = a.clamp_min(1e-30).log_().mul_(a).sum(-1).neg_()  # [B, H, n] nats (0 log 0 = 0)
    log_support = torch.log1p(pos.to(a.dtype)).clamp_min(math.log(2.0))  # [n]; row 0 masked
    row_vals = torch.stack(
        [
            a.diagonal(dim1=-2, dim2=-1),
            a[..., 0],
            *skew[..., 1:5].unbind(-1),  # sub-diagonals 1..4 (key 0 left out)
            a[..., 1:].amax(-1) if n > 1 else a.new_zeros(B, H, n),
            ent / log_support,
        ],
        dim=2,
    )  # [B, H, 8, n]
    row_masks = rmask[:, :, None, :].expand(B, 1, 8, n).clone()  # [B, 1, 8, n]
    row_masks[:, :, 2:6] &= pos > torch.arange(1, 5, device=pos.device)[:, None]  # q > o
    stats = _masked_stats(row_vals, row_masks, levels)  # [B, H, 8, 6]

    n_rows = rows.sum(-1).clamp_min(1).to(a.dtype)[:, None, None]  # [B, 1, 1]
    pos_f = pos.to(a.dtype)
    per_row = torch.stack(
        [
            ent,
            skew[..., _MID:_FAR].sum(-1),  # mass at distances 17..63
            skew[..., _FAR:].sum(-1),  # mass at distances >= 64
            (pos_f - a @ pos_f) / pos_f.clamp_min(1.0),  # mean distance / q
        ],
        dim=-1,
    )  # [B, H, n, 4]
    row_means = (per_row * rmask[..., None]).sum(2) / n_rows  # [B, H, 4]

    # distance profile: mean over rows q > d of S[q, d]
    col_rows = (rows[:, :, None] & skew_ok).sum(1).clamp_min(1).to(a.dtype)  # [B, n(d)]
    profile = skew.sum(2) / col_rows[:, None, :]  # [B, H, n]
    prof = a.new_zeros(B, H, len(_PROFILE))
    avail = min(n, _PROFILE[-1] + 1) - _PROFILE[0]
    if avail > 0:
        prof[..., :avail] = profile[..., _PROFILE[0] : _PROFILE[0] + avail]

    # Gram matrices over every other row (or key), a quarter of the n^3 cost, in one batch:
    # rows of A, columns of A (padding keys' columns are already zero, since only padding
    # rows could attend to them) and rows of the skewed pattern
    sub = slice(1, n, _GRAM_STRIDE)  # rows / keys 1, 3, 5, ...
    m = len(range(*sub.indices(n)))
    x = torch.stack([a[:, :, sub], a[..., sub].mT, skew[:, :, sub]])  # [3, B, H, m, n]
    row_ok = rmask[..., sub].expand(B, H, m)
    key_ok = valid[:, None, sub].expand(B, H, m)
    gmask = torch.stack([row_ok, key_ok, row_ok])  # [3, B, H, m]
    grams = _gram_stats(x.view(-1, m, n), gmask.reshape(-1, m)).view(3, B, H, 7)
    grams = grams.permute(1, 2, 0, 3).reshape(B, H, 21)

    out = torch.cat([stats.flatten(2), row_means[..., :1], prof, row_means[..., 1:], grams], -1)
    return torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)


class MotifFeatures:
    """The motif features of every head on the first ``n_sequences`` sequences of the dataset.

    An :class:`~headscope.metrics.accumulator.Accumulator`: each sequence's features depend on
    that sequence alone, so shards merge by copying the rows each one filled.
    """

    def __init__(self, n_layers: int, n_heads: int, n_sequences: int):
        self.n_layers, self.n_heads, self.n_sequences = n_layers, n_heads, n_sequences
        F = len(MOTIF_FEATURE_NAMES)
        self.features = torch.zeros(n_layers, n_heads, n_sequences, F)  # [L, H, M, F] float32
        self.filled = torch.zeros(n_sequences, dtype=torch.bool)  # [M] sequences seen
        self._corner: Tensor | None = None  # top-left rows of a layer arriving in blocks

    def update(self, batch: LayerBatch) -> None:
        """Features of the batch's sequences with index < ``n_sequences`` (needs ``seq_idx``).

        A layer in blocks of query rows: the rows of the top-left block are gathered until the
        block is complete."""
        seq_idx = batch.need("seq_idx")
        mine = seq_idx < self.n_sequences
        if not mine.any():
            return
        # the whole batch is the common case: no copy of the pattern then
        whole = bool(mine.all())
        pattern, valid = batch.pattern, batch.valid
        if not batch.is_whole:
            n = min(batch.seq_len, MOTIF_BLOCK)
            s, S = batch.row_start, batch.row_stop
            if s >= n:
                return
            if s == 0:
                B, H = int(mine.sum()), batch.n_heads
                self._corner = pattern.new_zeros(B, H, n, n)  # [B', H, n, n]
            assert self._corner is not None, "blocks of a layer must start at row 0"
            e = min(S, n)
            rows = pattern[:, :, : e - s, :e]
            self._corner[:, :, s:e, :e] = rows if whole else rows[mine]
            if e < n and not batch.is_last:
                return
            pattern, self._corner = self._corner, None
            valid = (valid if whole else valid[mine])[:, :n]
            whole = True  # the corner holds only my sequences
        feats = motif_features(
            pattern if whole else pattern[mine], valid if whole else valid[mine]
        )  # [B', H, F]
        self.features[batch.layer][:, seq_idx[mine]] = feats.transpose(0, 1).float()
        self.filled[seq_idx[mine]] = True

    def merge(self, other: MotifFeatures) -> None:
        if self.features.shape != other.features.shape:
            raise ValueError("can only merge motif features of the same shape")
        fill = other.filled
        self.features[:, :, fill] = other.features[:, :, fill]
        self.filled |= fill

    def state_dict(self) -> dict[str, Tensor]:
        """``features`` [L, H, M, F] float32 (zero where not filled), ``filled`` [M] bool."""
        return {"features": self.features.clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["features"].shape != self.features.shape:
            raise ValueError(f"features has shape {tuple(state['features'].shape)}")
        self.features = state["features"].float().clone()
        self.filled = state["filled"].bool().clone()

    def seen(self, layers: list[int]) -> Tensor | None:
        """[L', H, M', F] features of ``layers`` on the sequences seen; None if there are none."""
        if not self.filled.any():
            return None
        return self.features[layers][:, :, self.filled]


class MotifEmbedder:
    """Feature normaliser (mean/std per feature) + PCA to 16 dimensions, saved as safetensors.

    Fit once on the features of many (head, sequence) patterns; the saved file can embed
    patterns from other runs and other models (the features do not depend on the model).
    """

    def __init__(
        self,
        mean: Tensor,
        std: Tensor,
        components: Tensor,
        explained_variance_ratio: Tensor,
    ):
        self.mean = mean  # [F] float64
        self.std = std  # [F] float64
        self.components = components  # [16, F] float64
        self.explained_variance_ratio = explained_variance_ratio  # [16] float64

    @classmethod
    def fit(cls, features: Tensor, dim: int = EMBED_DIM) -> MotifEmbedder:
        """features: [N, F] (one row per (head, sequence)) -> fitted embedder.

        Constant features get std 1. PCA is the eigendecomposition of the float64 covariance
        of the standardised features; each component's largest loading is made positive.
        """
        x = features.reshape(-1, features.shape[-1]).double()
        mean = x.mean(0)
        std = x.std(0, correction=0)
        std = torch.where(std > 1e-12, std, 1.0)
        z = (x - mean) / std
        cov = z.T @ z / max(z.shape[0] - 1, 1)  # [F, F]
        with single_threaded():
            evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        k = min(dim, evecs.shape[1])
        comps = torch.zeros(dim, x.shape[1], dtype=torch.float64)
        comps[:k] = orient_components(evecs[:, :k].T)
        ratio = torch.zeros(dim, dtype=torch.float64)
        total = evals.sum()
        if total > 0:
            ratio[:k] = evals[:k] / total
        return cls(mean, std, comps, ratio)

    def embed(self, features: Tensor) -> Tensor:
        """features: [..., F] -> [..., 16] float32."""
        z = (features.double() - self.mean) / self.std
        return (z @ self.components.T).float()

    def save(self, path: str | Path) -> None:
        """Write a safetensors file with the feature names and block size in its metadata."""
        write_tensors(
            path,
            {
                "mean": self.mean.contiguous(),
                "std": self.std.contiguous(),
                "components": self.components.contiguous(),
                "explained_variance_ratio": self.explained_variance_ratio.contiguous(),
            },
            metadata={
                "format": _FORMAT,
                "block": str(MOTIF_BLOCK),
                "feature_names": json.dumps(list(MOTIF_FEATURE_NAMES)),
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> MotifEmbedder:
        """Read a file written by :meth:`save`; refuses one made with a different feature set."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a motif embedder ({meta.get('format')!r})")
        names = tuple(json.loads(meta.get("feature_names", "[]")))
        if names != MOTIF_FEATURE_NAMES or meta.get("block") != str(MOTIF_BLOCK):
            raise ValueError(f"{path} was fitted on a different motif feature set")
        t = load_file(str(path))
        return cls(t["mean"], t["std"], t["components"], t["explained_variance_ratio"])


def head_distances(emb: Tensor, chunk: int = 64) -> Tensor:
    """Mean over sequences of the Euclidean distance between two heads' embeddings.

    emb: [N_heads, S, 16] -> [N_heads, N_heads] float64, symmetric, zero diagonal.
    """
    n_heads, S, _ = emb.shape
    total = torch.zeros(n_heads, n_heads, dtype=torch.float64)
    per_seq = emb.double().transpose(0, 1)  # [S, N_heads, 16]
    for start in range(0, S, chunk):  # chunks bound the [chunk, N, N] temporary
        block = per_seq[start : start + chunk]
        total += torch.cdist(block, block, compute_mode="donot_use_mm_for_euclid_dist").sum(0)
    dist = total / max(S, 1)
    dist = (dist + dist.T) / 2
    dist.fill_diagonal_(0.0)
    return dist


def _orient(xy: Tensor) -> Tensor:
    """Flip each axis of [N, 2] so the point farthest from 0 on it is positive (determinism)."""
    idx = xy.abs().argmax(0)  # [2]
    sign = xy[idx, torch.arange(xy.shape[1])].sign()
    return xy * torch.where(sign == 0, 1.0, sign)


def head_map(
    dist: Tensor, n_neighbors: int = 16, perplexity: float = 30.0, random_state: int = 0
) -> dict[str, list[list[float]]]:
    """2-D maps of the heads from their distance matrix: ``{"isomap": [[x, y]], "tsne": ...}``.

    dist: [N, N]. Isomap (dense eigensolver) and t-SNE (random init, fixed ``random_state``)
    on the precomputed distances, single-threaded; both deterministic, each axis flipped so
    its most extreme point is positive. Neighbour count and perplexity shrink for small N.
    """
    from sklearn.manifold import TSNE, Isomap
    from threadpoolctl import threadpool_limits

    d = dist.double().cpu().numpy()
    n = d.shape[0]
    if n < 3:
        return {"isomap": [[0.0, 0.0] for _ in range(n)], "tsne": [[0.0, 0.0] for _ in range(n)]}
    iso = Isomap(
        n_neighbors=min(n_neighbors, n - 1),
        n_components=2,
        metric="precomputed",
        eigen_solver="dense",
    )
    tsne = TSNE(
        n_components=2,
        metric="precomputed",
        init="random",
        perplexity=min(perplexity, (n - 1) / 3),
        random_state=random_state,
    )
    # One thread: sklearn's OpenMP t-SNE is reproducible bit for bit that way, and on a busy
    # 2-core machine several times faster (1.5 s instead of 7.5 s for 270 heads).
    with threadpool_limits(1):
        iso_xy = iso.fit_transform(d)
        tsne_xy = tsne.fit_transform(d)
    return {
        "isomap": _orient(torch.from_numpy(iso_xy)).tolist(),
        "tsne": _orient(torch.from_numpy(tsne_xy)).tolist(),
    }


def nearest_heads(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest other heads of every head.

    dist: [N, N] -> (indices [N, k] int64, distances [N, k]), nearest first, ties by index.
    """
    n = dist.shape[0]
    d = dist.clone().fill_diagonal_(float("inf"))
    order = d.argsort(dim=-1, stable=True)[:, : min(k, n - 1)]
    return order, d.gather(-1, order)
