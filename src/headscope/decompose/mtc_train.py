"""Train and evaluate multi-token transcoders, and compare the MTC with its two baselines.

Loss per step (on a minibatch of contexts, destinations at positions >= 1)::

    Σ‖ŷ − y‖² / Σ‖y − ȳ‖²                    normalised MSE in the decoder's (scaled) space
    + l1 · warm-up · mean_positions Σ_f a_f    L1 on source activations (all positions)
    + neg · mean_positions Σ_f relu(−pre_f)    the negative pre-activation penalty
    (+ the SAE's normalised MSE on its input, for ``sae_mtc``)

"Progress on Attention" compares the MTC against a single-head MTC (a feature moved by one
head) and against SAE features moved by a single-head decoder; :func:`compare_mtcs` trains all
three on the same data with the same settings and reports (L0, MSE, FVE) on held-out contexts,
with the k-means cluster sizes of the MTC's head loadings.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from headscope.decompose.common import (
    Log,
    Reconstruction,
    Schedule,
    drop_parallel_grad_,
    neg_penalty,
    no_log,
    norm_scale,
    set_lr,
)
from headscope.decompose.data import LayerData
from headscope.decompose.mtc import MTC, MTCConfig, Target, Variant
from headscope.decompose.results import ClusterSizes, MTCComparison, MTCStats
from headscope.dictionaries.clusters import kmeans_sweep
from headscope.errors import InputError
from headscope.model.spec import head_name

LOADING_LR_FACTOR = 10.0  # loadings are O(1/H) per entry: they need larger steps than weights


def target_of(data: LayerData, target: Target) -> Tensor:
    """``[N, T, d]`` the tensor an MTC of ``target`` predicts."""
    if target == "attn_out":
        return data.attn_out
    if data.resid_post is None:
        raise InputError("the last layer has no residual after it in the capture: use attn_out")
    return data.resid_post


def _variance(y: Tensor) -> float:
    """Mean over destination rows of ‖y − ȳ‖² (``y [N, T, d]``, positions >= 1)."""
    rows = y[:, 1:].reshape(-1, y.shape[-1]).double()
    return float((rows - rows.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12))


def train_mtc(
    train: LayerData,
    eval_data: LayerData,
    *,
    n_features: int = 1024,
    variant: Variant = "mtc",
    target: Target = "attn_out",
    k_moved: int = 256,
    l1: float = 1e-3,
    neg: float = 1e-5,
    epochs: int = 4,
    batch_size: int = 4,
    lr: float = 1e-2,
    seed: int = 0,
    model_name: str = "",
    log: Log = no_log,
) -> tuple[MTC, MTCStats]:
    """Train one MTC of ``variant`` on ``train`` contexts; evaluate it on ``eval_data``."""
    t0 = time.perf_counter()
    device = train.resid.device
    y_all = target_of(train, target)
    cfg = MTCConfig(
        d_model=train.resid.shape[-1],
        n_heads=train.pattern.shape[1],
        n_features=n_features,
        layer=train.layer,
        variant=variant,
        target=target,
        k_moved=k_moved,
        l1=l1,
        neg=neg,
        target_scale=norm_scale(y_all),
        model_name=model_name,
    )
    gen = torch.Generator().manual_seed(seed)
    mtc = MTC(cfg, generator=gen, device=device)
    y_var = _variance(y_all * cfg.target_scale)
    x_var = _variance(MTC.encoder_input(train.resid))
    others = [p for n, p in mtc.named_parameters() if n != "loading"]
    groups: list[dict[str, Any]] = [
        {"params": others},
        {"params": [mtc.loading], "lr": lr * LOADING_LR_FACTOR},
    ]
    opt = torch.optim.Adam(
        groups,
        lr=lr,
        foreach=True,
    )
    steps_per_epoch = -(-train.n_contexts // batch_size)
    sched = Schedule(steps=epochs * steps_per_epoch, lr=lr)
    step = 0
    for epoch in range(epochs):
        for batch in train.batches(batch_size, generator=gen):
            set_lr(opt, sched.lr_at(step))
            opt.param_groups[1]["lr"] = sched.lr_at(step) * LOADING_LR_FACTOR
            losses = _losses(mtc, batch, target_of(batch, target), y_var, x_var)
            loss = (
                losses["mse"]
                + losses["sae"]
                + l1 * sched.l1_factor(step) * losses["l1"]
                + neg * losses["neg"]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            drop_parallel_grad_(mtc.W_dec)
            if variant == "sae_mtc":
                drop_parallel_grad_(mtc.W_sae_dec)
            opt.step()
            mtc.constrain_()
            step += 1
        log(
            f"{variant} epoch {epoch + 1}/{epochs}: nmse {float(losses['mse'].detach()):.3f} "
            f"l1 {float(losses['l1'].detach()):.1f} ({time.perf_counter() - t0:.0f} s)"
        )
    seconds = time.perf_counter() - t0
    stats = evaluate_mtc(mtc, eval_data, train_tokens=train.n_tokens * epochs, seconds=seconds)
    return mtc, stats


def _losses(mtc: MTC, batch: LayerData, y: Tensor, y_var: float, x_var: float) -> dict[str, Tensor]:
    cfg = mtc.cfg
    pre = mtc.pre_activations(batch.resid)  # [B, T, F]
    acts = pre.relu()
    sae = torch.zeros((), device=pre.device)
    if cfg.variant == "sae_mtc":
        err = mtc.sae_reconstruct(acts) - mtc.encoder_input(batch.resid)  # [B, T, d]
        sae = err[:, 1:].pow(2).sum(-1).mean() / x_var
        acts_moved = acts.detach()
    else:
        acts_moved = acts
    m, idx = mtc.move(acts_moved, batch.pattern, straight_through=cfg.single_head)
    pred = torch.bmm(m, mtc.W_dec[idx]) + mtc.b_dec  # [B, T, d], scaled target space
    mse = (pred - y * cfg.target_scale)[:, 1:].pow(2).sum(-1).mean() / y_var
    return {"mse": mse, "sae": sae, "l1": acts.sum(-1).mean(), "neg": neg_penalty(pre)}


@torch.no_grad()
def evaluate_mtc(
    mtc: MTC,
    data: LayerData,
    *,
    batch_size: int = 8,
    train_tokens: int = 0,
    seconds: float = 0.0,
) -> MTCStats:
    """(L0, MSE, FVE) of ``mtc`` on ``data`` (destinations at positions >= 1)."""
    cfg = mtc.cfg
    rec, sae_rec = Reconstruction(), Reconstruction()
    ever = torch.zeros(cfg.n_features, dtype=torch.bool, device=mtc.W_enc.device)
    l0 = moved_l0 = 0.0
    for b in data.batches(batch_size):
        acts = mtc.encode(b.resid)  # [B, T, F]
        m, idx = mtc.move(acts, b.pattern)
        rec.update(mtc.decode(m, idx)[:, 1:], target_of(b, cfg.target)[:, 1:])
        active = acts[:, 1:] > 0  # [B, T-1, F]
        l0 += float(active.sum())
        moved_l0 += float(active.gather(2, idx[:, None, :].expand(-1, active.shape[1], -1)).sum())
        ever |= active.any(0).any(0)
        if cfg.variant == "sae_mtc":
            sae_rec.update(mtc.sae_reconstruct(acts[:, 1:]), mtc.encoder_input(b.resid[:, 1:]))
    n = max(1, data.n_tokens)
    return MTCStats(
        variant=cfg.variant,
        n_features=cfg.n_features,
        l1=cfg.l1,
        l0=l0 / n,
        moved_l0=moved_l0 / n,
        mse=rec.mse,
        fve=rec.fve,
        sae_fve=sae_rec.fve if cfg.variant == "sae_mtc" else None,
        dead_fraction=1.0 - float(ever.float().mean()),
        train_tokens=train_tokens,
        eval_tokens=data.n_tokens,
        seconds=seconds,
    )


@torch.no_grad()
def live_features(mtc: MTC, data: LayerData, batch_size: int = 8) -> Tensor:
    """``[F]`` bool: features active at some source position of ``data``."""
    ever = torch.zeros(mtc.cfg.n_features, dtype=torch.bool, device=mtc.W_enc.device)
    for b in data.batches(batch_size):
        ever |= (mtc.encode(b.resid) > 0).any(0).any(0)
    return ever


def loading_clusters(
    loadings: Tensor, ks: tuple[int, ...] = (2, 8, 32, 128, 512), seed: int = 0
) -> list[ClusterSizes]:
    """k-means of head-loading rows ``[F_live, H + 1]`` for each k that fits (k <= rows / 2)."""
    usable = tuple(k for k in ks if 1 <= k <= loadings.shape[0] // 2)
    sweep = kmeans_sweep(loadings, usable, seed=seed) if usable else {}
    return [
        ClusterSizes(k=k, sizes=v["sizes"], inertia=v["inertia"]) for k, v in sorted(sweep.items())
    ]


def compare_mtcs(
    train: LayerData,
    eval_data: LayerData,
    *,
    variants: tuple[Variant, ...] = ("mtc", "single_head", "sae_mtc"),
    cluster_ks: tuple[int, ...] = (2, 8, 32, 128, 512),
    log: Log = no_log,
    **options: Any,
) -> tuple[MTCComparison, dict[Variant, MTC]]:
    """Train each variant with the same ``options`` (see :func:`train_mtc`) on the same data;
    the comparison table and the trained MTCs by variant."""
    if not variants:
        raise InputError("give at least one variant")
    rows: list[MTCStats] = []
    trained: dict[Variant, MTC] = {}
    for variant in variants:
        mtc, stats = train_mtc(train, eval_data, variant=variant, log=log, **options)
        rows.append(stats)
        trained[variant] = mtc
    ref = trained.get("mtc", next(iter(trained.values())))
    H = ref.cfg.n_heads
    live = live_features(ref, eval_data)
    loads = ref.head_loadings()[live]  # [F_live, H + 1]
    dominant = (
        torch.bincount(loads.argmax(-1), minlength=H + 1) if len(loads) else torch.zeros(H + 1)
    )
    comparison = MTCComparison(
        layer=train.layer,
        target=ref.cfg.target,
        rows=rows,
        columns=[head_name(train.layer, h) for h in range(H)] + ["identity"],
        mean_loading=(loads.mean(0) if len(loads) else torch.zeros(H + 1)).tolist(),
        dominant=[int(c) for c in dominant],
        clusters=loading_clusters(loads.cpu(), cluster_ks),
    )
    return comparison, trained


def format_comparison(c: MTCComparison) -> str:
    """The comparison as a text table."""
    lines = [
        f"multi-token transcoders, layer {c.layer}, target {c.target}",
        f"{'variant':<12} {'features':>8} {'L0':>7} {'moved L0':>8} {'MSE':>10} {'FVE':>7} "
        f"{'dead':>6} {'seconds':>8}",
    ]
    for r in c.rows:
        extra = f"  (SAE FVE {r.sae_fve:.3f})" if r.sae_fve is not None else ""
        lines.append(
            f"{r.variant:<12} {r.n_features:>8} {r.l0:>7.1f} {r.moved_l0:>8.1f} {r.mse:>10.4g} "
            f"{r.fve:>7.3f} {r.dead_fraction:>6.2f} {r.seconds:>8.1f}{extra}"
        )
    lines.append("MTC head loadings (mean |loading| over live features; features by largest):")
    for name, mean, n in zip(c.columns, c.mean_loading, c.dominant, strict=True):
        lines.append(f"  {name:>9}: {mean:.3f}  {n:>5} features")
    for cl in c.clusters:
        head = ", ".join(str(s) for s in cl.sizes[:12])
        more = " ..." if len(cl.sizes) > 12 else ""
        lines.append(f"  k-means k={cl.k:<4} cluster sizes: {head}{more}")
    return "\n".join(lines)
