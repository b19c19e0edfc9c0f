"""Initialise, train and evaluate head splits; sweep k.

Loss per step (destinations at positions >= 1)::

    Σ‖Σ_i out_i − y‖² / Σ‖y − ȳ‖²
    + weight_penalty · Σ_i (simplicity_i / simplicity_original)^β
    + exclusive · mean_t Σ_i √(‖out_i(t)‖ / rms‖y‖)
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from headscope.decompose.common import Log, Reconstruction, Schedule, adam, no_log, set_lr
from headscope.decompose.data import LayerData
from headscope.decompose.results import SplitExample, SplitReport, SplitStats
from headscope.decompose.split import HeadSplit, SplitConfig
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.model.spec import head_name


def head_target(adapter: ModelAdapter, data: LayerData, heads: Sequence[int]) -> Tensor:
    """``[N, T, d]`` the summed output ``Σ_h z_h W_O[h]`` of ``heads`` (no bias)."""
    W_O = adapter.weights(data.layer).W_O.float().to(data.z.device)  # [H, D, d]
    idx = list(heads)
    return torch.einsum("nthd,hdm->ntm", data.z[:, :, idx], W_O[idx])


def _dims(importance: Tensor, d_sub: int, rotary: int) -> list[int]:
    """The original head dims a sub-head of ``d_sub`` dims keeps (the most important ones; with
    RoPE whole rotate-half pairs ``(j, j + D/2)``), in the order RoPE needs."""
    D = importance.shape[0]
    if d_sub > D:
        raise InputError(f"sub-head dim {d_sub} is larger than the head's {D}")
    if d_sub == D:
        return list(range(D))
    if rotary == 0:
        return sorted(importance.topk(d_sub).indices.tolist())
    if rotary != D:
        raise InputError("with partial RoPE the sub-head dim must equal the head dim")
    if d_sub % 2:
        raise InputError(f"with RoPE the sub-head dim must be even, got {d_sub}")
    half = D // 2
    pairs = sorted((importance[:half] + importance[half:]).topk(d_sub // 2).indices.tolist())
    return pairs + [j + half for j in pairs]


def init_split(
    adapter: ModelAdapter,
    layer: int,
    heads: Sequence[int],
    n_sub: int,
    *,
    d_head: int | None = None,
    noise: float = 0.1,
    weight_penalty: float = 0.1,
    beta: float = 0.75,
    exclusive: float = 0.03,
    routed: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> HeadSplit:
    """k sub-heads copied from the original head(s) (their ``d_head`` most important dims) plus
    Gaussian noise of ``noise`` x each matrix's RMS, with ``W_O / k``."""
    s = adapter.spec
    if adapter.qk_norm(layer) is not None:
        raise InputError("head splitting does not support models with QK-norm yet")
    heads = [int(h) for h in heads]
    for h in heads:
        if not 0 <= h < s.n_heads:
            raise InputError(f"head must be in 0..{s.n_heads - 1}, got {h}")
    w = adapter.weights(layer)
    kv = [int(w.kv_of_head[h]) for h in heads]
    mats = {
        "W_Q": w.W_Q[heads],
        "b_Q": w.b_Q[heads],
        "W_K": w.W_K[kv],
        "b_K": w.b_K[kv],
        "W_V": w.W_V[kv],
        "b_V": w.b_V[kv],
        "W_O": w.W_O[heads].transpose(1, 2),  # [n, d, D]: dims last, like the others
    }
    mats = {n: t.detach().float().cpu() for n, t in mats.items()}

    def col_norms(name: str) -> Tensor:  # [D] summed over the heads
        return mats[name].norm(dim=-2).sum(0) if mats[name].dim() == 3 else mats[name].abs().sum(0)

    D = s.d_head
    d_sub = d_head or D
    qk_index = _dims(col_norms("W_Q") * col_norms("W_K"), d_sub, s.rotary_dim)
    ov_index = _dims(col_norms("W_V") * col_norms("W_O"), d_sub, 0)
    rotary = d_sub if s.rotary_dim == D else (s.rotary_dim if d_sub == D else 0)
    norm = adapter.ln_attn(layer)
    cfg = SplitConfig(
        d_model=s.d_model,
        d_head=d_sub,
        n_sub=n_sub,
        layer=layer,
        heads=tuple(heads),
        qk_index=tuple(qk_index),
        ov_index=tuple(ov_index),
        rotary_dim=rotary,
        attn_scale=s.attn_scale,
        softcap=s.attn_softcap,
        window=s.sliding_window[layer],
        norm_kind=s.norm.kind,
        norm_eps=s.norm.eps,
        weight_penalty=weight_penalty,
        beta=beta,
        exclusive=exclusive,
        routed=routed,
        noise=noise,
        model_name=adapter.name,
    )
    split = HeadSplit(cfg, device=device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        split.norm_weight.copy_(norm.weight.float())
        if norm.bias is not None:
            split.norm_bias.copy_(norm.bias.float())
        for name, t in mats.items():
            index = qk_index if name[-1] in "QK" else ov_index
            t = t[..., index]  # [n, (d,) D']
            t = t[torch.arange(n_sub) % len(heads)]  # [k, (d,) D']
            rms = t.pow(2).mean().sqrt()
            t = t + noise * rms * torch.randn(t.shape, generator=gen)
            if name == "W_O":
                t = t.transpose(1, 2) / n_sub  # [k, D', d]
            getattr(split, name).copy_(t)
    return split


def spherical_kmeans(
    x: Tensor, k: int, weight: Tensor | None = None, *, seed: int = 0, iters: int = 30
) -> Tensor:
    """``[n]`` cluster of each row of ``x [n, d]`` by direction: k-means on unit rows with cosine
    similarity, rows weighted by ``weight [n]`` (default 1), k-means++ seeding from ``seed``."""
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = torch.ones(len(u), device=x.device) if weight is None else weight.float()
    gen = torch.Generator().manual_seed(seed)
    centres = [u[int(torch.multinomial(w.cpu() + 1e-12, 1, generator=gen))]]
    for _ in range(1, k):
        sim = (u @ torch.stack(centres).T).amax(-1)  # [n]
        spread = w * (1 - sim).clamp_min(0) + 1e-12
        centres.append(u[int(torch.multinomial(spread.cpu(), 1, generator=gen))])
    c = torch.stack(centres)  # [k, d]
    for _ in range(iters):
        label = (u @ c.T).argmax(-1)
        new = torch.zeros_like(c).index_add_(0, label, u * w[:, None])
        empty = new.norm(dim=-1) == 0
        new[empty] = c[empty]
        c = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (u @ c.T).argmax(-1)


def _routes(split: HeadSplit, data: LayerData, y: Tensor, k: int, seed: int) -> Tensor:
    """``[N, T]`` the sub-head each position starts out handling: spherical k-means of the
    original head's centred, pre-RoPE queries (which behaviour the head is asked for), each
    position weighted by its squared output norm (how much the head does there)."""
    with torch.no_grad():
        # the sub-heads' mean query weights are the original's up to the noise
        q = split.normalise(data.resid) @ split.W_Q.mean(0) + split.b_Q.mean(0)  # [N, T, D']
    rows = (q - q[:, 1:].mean((0, 1))).reshape(-1, q.shape[-1])
    weight = y.reshape(-1, y.shape[-1]).pow(2).sum(-1)
    weight.view(y.shape[:2])[:, 0] = 0.0
    return spherical_kmeans(rows, k, weight, seed=seed).view(y.shape[:2])


def _simplicity_ref(split: HeadSplit) -> float:
    """The simplicity term of the original head(s) as one head (what the penalty is relative
    to): recovered from the initial sub-heads up to the noise."""
    with torch.no_grad():
        return float(split.simplicity().mean().clamp_min(1e-12)) * split.cfg.n_sub**2


def train_split(
    adapter: ModelAdapter,
    train: LayerData,
    eval_data: LayerData,
    heads: Sequence[int],
    n_sub: int,
    *,
    d_head: int | None = None,
    noise: float = 0.1,
    weight_penalty: float = 0.1,
    beta: float = 0.75,
    exclusive: float = 0.03,
    routed: float = 0.5,
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    log: Log = no_log,
) -> tuple[HeadSplit, SplitStats]:
    """Split ``heads`` of ``train``'s layer (usually one head) into ``n_sub`` sub-heads.

    For the first ``routed`` fraction of steps each sub-head is trained alone on the positions
    of one cluster of the head's queries (spherical k-means) and on zero elsewhere:
    the sum of copies of one head otherwise settles on one sub-head doing everything, a local
    minimum of the penalties. The remaining steps train the sum on the head's output."""
    t0 = time.perf_counter()
    device = train.resid.device
    split = init_split(
        adapter,
        train.layer,
        heads,
        n_sub,
        d_head=d_head,
        noise=noise,
        weight_penalty=weight_penalty,
        beta=beta,
        exclusive=exclusive,
        routed=routed,
        seed=seed,
        device=device,
    )
    init = evaluate_split(split, eval_data, head_target(adapter, eval_data, heads))
    y_all = head_target(adapter, train, heads)
    rows = y_all[:, 1:].reshape(-1, y_all.shape[-1]).double()
    y_var = float((rows - rows.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12))
    y_rms = y_var**0.5
    ref = _simplicity_ref(split)
    routes = _routes(split, train, y_all, n_sub, seed)  # [N, T]
    opt = adam([p for p in split.parameters() if p.requires_grad], lr)
    sched = Schedule(steps=epochs * -(-train.n_contexts // batch_size), lr=lr, warmup=0.0)
    routed_steps = int(routed * sched.steps)
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    for epoch in range(epochs):
        for order in torch.randperm(train.n_contexts, generator=gen).split(batch_size):
            batch = train.select(order.to(device))
            set_lr(opt, sched.lr_at(step))
            y = head_target(adapter, batch, heads)[:, 1:]
            outs = split(batch.resid, train.rope)[:, :, 1:]  # [B, k, T-1, d]
            if step < routed_steps:  # each sub-head fits its own cluster's positions
                mine = torch.nn.functional.one_hot(routes[order.to(device), 1:], n_sub)
                goal = y[:, None] * mine.permute(0, 2, 1)[..., None]  # [B, k, T-1, d]
                mse = (outs - goal).pow(2).sum(-1).sum(1).mean() / y_var
            else:
                mse = (outs.sum(1) - y).pow(2).sum(-1).mean() / y_var
            simp = (split.simplicity() / ref).pow(beta).sum()
            excl = (outs.norm(dim=-1) / y_rms + 1e-4).sqrt().sum(1).mean()
            loss = mse + weight_penalty * simp + exclusive * excl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        log(
            f"split k={n_sub} epoch {epoch + 1}/{epochs}: nmse {float(mse.detach()):.4f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    seconds = time.perf_counter() - t0
    stats = evaluate_split(
        split,
        eval_data,
        head_target(adapter, eval_data, heads),
        init_fve=init.fve,
        train_tokens=train.n_tokens * epochs,
        seconds=seconds,
    )
    return split, stats


@torch.no_grad()
def shares(split: HeadSplit, data: LayerData, batch_size: int = 8) -> Tensor:
    """``[N, T, k]`` each sub-head's share of the summed output norms at every position."""
    parts = []
    for batch in data.batches(batch_size):
        norms = split(batch.resid, data.rope).norm(dim=-1).transpose(1, 2)  # [B, T, k]
        parts.append(norms / norms.sum(-1, keepdim=True).clamp_min(1e-12))
    return torch.cat(parts)


@torch.no_grad()
def evaluate_split(
    split: HeadSplit,
    data: LayerData,
    target: Tensor,
    *,
    init_fve: float | None = None,
    train_tokens: int = 0,
    seconds: float = 0.0,
    batch_size: int = 8,
) -> SplitStats:
    """Output FVE and per-sub-head shares of ``split`` on ``data`` against ``target``
    ``[N, T, d]`` (positions >= 1)."""
    rec = Reconstruction()
    for start in range(0, data.n_contexts, batch_size):
        part = data.select(slice(start, start + batch_size))
        outs = split(part.resid, data.rope)
        rec.update(outs.sum(1)[:, 1:], target[start : start + batch_size, 1:])
    share = shares(split, data, batch_size)[:, 1:]  # [N, T-1, k]
    k = split.cfg.n_sub
    handled = torch.bincount(share.argmax(-1).flatten(), minlength=k).float()
    return SplitStats(
        k=k,
        d_head=split.cfg.d_head,
        fve=rec.fve,
        init_fve=rec.fve if init_fve is None else init_fve,
        shares=share.reshape(-1, k).mean(0).tolist(),
        handled=(handled / handled.sum().clamp_min(1)).tolist(),
        train_tokens=train_tokens,
        eval_tokens=data.n_tokens,
        seconds=seconds,
    )


@torch.no_grad()
def split_examples(
    adapter: ModelAdapter, split: HeadSplit, data: LayerData, n: int = 8
) -> list[list[SplitExample]]:
    """For each sub-head, the ``n`` tokens it handles (largest share) with the largest output."""
    out: list[list[SplitExample]] = []
    share = shares(split, data)  # [N, T, k]
    norms = torch.cat(
        [split(b.resid, data.rope).norm(dim=-1).transpose(1, 2) for b in data.batches(8)]
    )  # [N, T, k]
    top = share.argmax(-1)  # [N, T]
    top[:, 0] = -1
    for i in range(split.cfg.n_sub):
        score = torch.where(top == i, norms[..., i], torch.full_like(norms[..., i], -1.0))
        best = score.flatten().topk(min(n, score.numel()))
        picks = []
        for value, flat in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            if value < 0:
                break
            c, t = divmod(flat, data.n_ctx)
            picks.append(
                SplitExample(
                    context=c,
                    position=t,
                    token=adapter.tokens.display(int(data.ids[c, t])),
                    share=float(share[c, t, i]),
                )
            )
        out.append(picks)
    return out


def split_sweep(
    adapter: ModelAdapter,
    train: LayerData,
    eval_data: LayerData,
    heads: Sequence[int],
    ks: Sequence[int] = (1, 2, 4),
    *,
    log: Log = no_log,
    **options,
) -> tuple[SplitReport, list[HeadSplit]]:
    """One :func:`train_split` per k: output FVE as k grows, and who handles what in the last."""
    if not ks:
        raise InputError("give at least one k")
    rows, splits = [], []
    for k in ks:
        split, stats = train_split(adapter, train, eval_data, heads, k, log=log, **options)
        rows.append(stats)
        splits.append(split)
    report = SplitReport(
        heads=[head_name(train.layer, h) for h in heads],
        rows=rows,
        examples=split_examples(adapter, splits[-1], eval_data),
    )
    return report, splits


def format_split(report: SplitReport) -> str:
    """The sweep as a text table, then the last split's example tokens per sub-head."""
    lines = [
        f"head split of {' + '.join(report.heads)}",
        f"{'k':>3} {'D':>4} {'FVE':>7} {'init FVE':>8} {'seconds':>8}  shares / handled",
    ]
    for r in report.rows:
        sh = " ".join(f"{s:.2f}" for s in r.shares)
        hd = " ".join(f"{h:.2f}" for h in r.handled)
        lines.append(
            f"{r.k:>3} {r.d_head:>4} {r.fve:>7.4f} {r.init_fve:>8.4f} {r.seconds:>8.1f}  "
            f"[{sh}] / [{hd}]"
        )
    for i, ex in enumerate(report.examples):
        toks = ", ".join(f"{e.token!r}@{e.context}:{e.position}" for e in ex)
        lines.append(f"  sub-head {i}: {toks}")
    return "\n".join(lines)
