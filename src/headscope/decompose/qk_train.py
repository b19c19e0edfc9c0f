"""Train and evaluate QK diagonalisations of one head; sweep sparsity to trace reconstruction
against the number of active QK features.

Loss per step (minibatch of contexts; query rows 1..T-1, since row 0 can only attend to itself)::

    softmax: mean_rows KL(A ‖ Â)          linear: Σ(Â − A)² / Σ(A − Ā)² over causal entries
    + l1 · warm-up · (mean_t Σ_f gq + mean_s Σ_f gk)
    + l1_product · warm-up · mean_{causal (t, s)} Σ_f gq[t, f] gk[s, f]
    + neg · (mean_t Σ_f relu(−pre_q) + mean_s Σ_f relu(−pre_k))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from headscope.decompose.common import (
    Log,
    Reconstruction,
    Schedule,
    adam,
    causal_mask,
    neg_penalty,
    no_log,
    norm_scale,
    set_lr,
)
from headscope.decompose.data import LayerData
from headscope.decompose.qk import QKActivations, QKConfig, QKDiagonal, QKVariant
from headscope.decompose.results import QKStats
from headscope.errors import InputError

_EPS = 1e-6


def head_tensors(data: LayerData, head: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """(q ``[N, T, D]``, k ``[N, T, D]``, pattern ``[N, T, T]``, kv head) of query head ``head``.

    Query heads share key/value heads in order (head h reads kv head ``h // (H / KV)``)."""
    H, KV = data.q.shape[1], data.k.shape[1]
    if not 0 <= head < H:
        raise InputError(f"head must be in 0..{H - 1}, got {head}")
    kv = head // (H // KV)
    return data.q[:, head], data.k[:, kv], data.pattern[:, head], kv


def _kl_rows(target: Tensor, log_pred: Tensor, keep: Tensor) -> Tensor:
    """``[B, T]`` KL(target ‖ pred) per query row (masked entries contribute nothing)."""
    log_pred = log_pred.masked_fill(~keep, 0.0)
    return (torch.xlogy(target, target) - target * log_pred).sum(-1)


def log_pattern(model: QKDiagonal, scores: Tensor, keep: Tensor) -> Tensor:
    """``[B, T, T]`` log of the reconstructed pattern as a distribution per row. The linear
    variant's rows are clipped at 0, smoothed by 1e-6 and renormalised (for KL and top-1)."""
    if model.cfg.variant == "softmax":
        return scores.masked_fill(~keep, float("-inf")).log_softmax(-1)
    p = (scores.clamp_min(0.0) + _EPS).masked_fill(~keep, 0.0)
    return (p / p.sum(-1, keepdim=True)).log()


def _penalties(acts: QKActivations, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(side L1, product L1 per causal pair, negative pre-activation penalty)."""
    side = acts.gq.sum(-1).mean() + acts.gk.sum(-1).mean()
    # Σ_{s <= t} gk[s, f] for every query t, through the mask (sliding windows included)
    reach = keep.to(acts.gk.dtype) @ acts.gk  # [B, T, F]
    n_pairs = keep.sum()
    product = (acts.gq * reach).sum() / (acts.gq.shape[0] * n_pairs)
    neg = neg_penalty(acts.pre_q) + neg_penalty(acts.pre_k)
    return side, product, neg


def train_qk(
    train: LayerData,
    eval_data: LayerData,
    head: int,
    *,
    n_features: int = 64,
    rank: int = 1,
    variant: QKVariant = "softmax",
    l1: float = 1e-3,
    l1_product: float = 1e-3,
    neg: float = 1e-3,
    epochs: int = 8,
    batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
    window: int | None = None,
    model_name: str = "",
    log: Log = no_log,
) -> tuple[QKDiagonal, QKStats]:
    """Train a QK diagonalisation of query head ``head`` of ``train``'s layer; evaluate it on
    ``eval_data``."""
    t0 = time.perf_counter()
    q, k, A, kv = head_tensors(train, head)
    cfg = QKConfig(
        d_head=q.shape[-1],
        n_features=n_features,
        layer=train.layer,
        head=head,
        kv_head=kv,
        rank=rank,
        variant=variant,
        l1=l1,
        l1_product=l1_product,
        neg=neg,
        q_scale=norm_scale(q),
        k_scale=norm_scale(k),
        window=window,
        model_name=model_name,
    )
    device = q.device
    gen = torch.Generator().manual_seed(seed)
    model = QKDiagonal(cfg, generator=gen, device=device)
    keep = causal_mask(train.n_ctx, device, window)
    entries = A[:, 1:][keep[1:].expand(A.shape[0], -1, -1)]
    a_var = float(entries.double().var().clamp_min(1e-12))
    opt = adam(model.parameters(), lr)
    sched = Schedule(steps=epochs * -(-train.n_contexts // batch_size), lr=lr)
    step = 0
    for epoch in range(epochs):
        for batch in train.batches(batch_size, generator=gen):
            bq, bk, bA, _ = head_tensors(batch, head)
            set_lr(opt, sched.lr_at(step))
            acts = model.activations(bq, bk)
            scores = model.scores_of(acts)
            if variant == "softmax":
                fit = _kl_rows(bA, log_pattern(model, scores, keep), keep)[:, 1:].mean()
            else:
                err = (model.pattern(scores, keep) - bA)[:, 1:].pow(2)
                fit = err.sum() / (bA.shape[0] * keep[1:].sum() * a_var)
            side, product, negative = _penalties(acts, keep)
            ramp = sched.l1_factor(step)
            loss = fit + ramp * (l1 * side + l1_product * product) + neg * negative
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        log(
            f"qk {variant} r={rank} epoch {epoch + 1}/{epochs}: fit {float(fit.detach()):.4f} "
            f"side {float(side.detach()):.2f} ({time.perf_counter() - t0:.0f} s)"
        )
    seconds = time.perf_counter() - t0
    stats = evaluate_qk(model, eval_data, train_tokens=train.n_tokens * epochs, seconds=seconds)
    return model, stats


@torch.no_grad()
def evaluate_qk(
    model: QKDiagonal,
    data: LayerData,
    *,
    batch_size: int = 8,
    train_tokens: int = 0,
    seconds: float = 0.0,
) -> QKStats:
    """Pattern reconstruction (KL, top-1 key, pattern FVE) and active-feature counts of
    ``model`` on ``data`` (query rows >= 1)."""
    cfg = model.cfg
    keep = causal_mask(data.n_ctx, data.q.device, cfg.window)
    rows_keep = keep[1:]
    n_rows = n_pairs = 0
    sums = dict.fromkeys(("kl", "uniform", "top1", "l0q", "l0k", "pair", "attended"), 0.0)
    rec = Reconstruction()
    log_uniform = -torch.log(rows_keep.sum(-1).to(torch.float32))  # [T-1]
    for batch in data.batches(batch_size):
        q, k, A, _ = head_tensors(batch, cfg.head)
        acts = model.activations(q, k)
        scores = model.scores_of(acts)
        logp = log_pattern(model, scores, keep)
        A1 = A[:, 1:]
        sums["kl"] += float(_kl_rows(A1, logp[:, 1:], rows_keep).sum())
        uniform = log_uniform[None, :, None].expand_as(A1)
        sums["uniform"] += float(_kl_rows(A1, uniform, rows_keep).sum())
        # ties count: the reconstruction's top key is one of the head's top keys
        picked = A1.gather(-1, logp[:, 1:].argmax(-1, keepdim=True))[..., 0]
        sums["top1"] += float((picked >= A1.amax(-1) * (1 - 1e-3)).sum())
        mask = rows_keep.expand(A.shape[0], -1, -1)
        rec.update(model.pattern(scores, keep)[:, 1:][mask][:, None], A1[mask][:, None])
        aq, ak = (acts.gq > 0).float(), (acts.gk > 0).float()
        sums["l0q"] += float(aq[:, 1:].sum())
        sums["l0k"] += float(ak[:, 1:].sum())
        both = aq @ ak.transpose(1, 2)  # [B, T, T] features active on both sides
        sums["pair"] += float(both[:, 1:][mask].sum())
        sums["attended"] += float((both[:, 1:] * A1).sum())
        n_rows += A1.shape[0] * A1.shape[1]
        n_pairs += int(mask.sum())
    return QKStats(
        variant=cfg.variant,
        n_features=cfg.n_features,
        rank=cfg.rank,
        l1=cfg.l1,
        l0_query=sums["l0q"] / max(1, n_rows),
        l0_key=sums["l0k"] / max(1, n_rows),
        l0_pair=sums["pair"] / max(1, n_pairs),
        l0_attended=sums["attended"] / max(1, n_rows),
        kl=sums["kl"] / max(1, n_rows),
        top1=sums["top1"] / max(1, n_rows),
        uniform_kl=sums["uniform"] / max(1, n_rows),
        pattern_fve=rec.fve,
        train_tokens=train_tokens,
        eval_tokens=data.n_tokens,
        seconds=seconds,
    )


def qk_sweep(
    train: LayerData,
    eval_data: LayerData,
    head: int,
    *,
    l1s: Sequence[float] = (3e-4, 1e-3, 3e-3, 1e-2),
    log: Log = no_log,
    **options: Any,
) -> tuple[list[QKStats], list[QKDiagonal]]:
    """One :func:`train_qk` per side-L1 coefficient (the product L1 follows it unless given):
    reconstruction against the number of active QK features."""
    if not l1s:
        raise InputError("give at least one L1 coefficient")
    rows, models = [], []
    for l1 in l1s:
        opts = {"l1_product": l1, **options}
        model, stats = train_qk(train, eval_data, head, l1=l1, log=log, **opts)
        rows.append(stats)
        models.append(model)
    return rows, models


def format_qk_table(head: str, rows: Sequence[QKStats]) -> str:
    """Reconstruction against active features, one row per trained model."""
    lines = [
        f"QK diagonalisation of {head}",
        f"{'variant':<8} {'rank':>4} {'F':>5} {'l1':>8} {'L0 q':>6} {'L0 k':>6} {'L0 pair':>7} "
        f"{'L0 att':>6} {'KL':>7} {'unif KL':>7} {'top-1':>6} {'pat FVE':>7} {'seconds':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r.variant:<8} {r.rank:>4} {r.n_features:>5} {r.l1:>8.1e} {r.l0_query:>6.2f} "
            f"{r.l0_key:>6.2f} {r.l0_pair:>7.2f} {r.l0_attended:>6.2f} {r.kl:>7.3f} "
            f"{r.uniform_kl:>7.3f} {r.top1:>6.3f} {r.pattern_fve:>7.3f} {r.seconds:>7.1f}"
        )
    return "\n".join(lines)
