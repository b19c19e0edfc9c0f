"""Pieces every decomposition trains with: input scales, penalties, the step schedule, and
reconstruction statistics computed exactly (float64 sums)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headscope.errors import InputError

Log = Callable[[str], None]


def no_log(_msg: str) -> None:
    pass


def norm_scale(x: Tensor) -> float:
    """``sqrt(d) / mean ‖x‖`` over destination positions: ``x [N, T, d]`` (position 0, the BOS
    sink with its outsized norm, left out). Multiplying by it gives rows of norm ~ sqrt(d)."""
    rows = x[:, 1:].reshape(-1, x.shape[-1]).double()
    mean = rows.norm(dim=-1).mean().item()
    if not math.isfinite(mean) or mean <= 0:
        raise InputError("activations are all zero (or not finite): nothing to decompose")
    return float(math.sqrt(x.shape[-1]) / mean)


def neg_penalty(pre: Tensor) -> Tensor:
    """Mean over rows of ``Σ_f relu(-pre)``: the negative pre-activation penalty of
    "Progress on Attention", which keeps features from dying (``pre [..., F]``)."""
    return pre.neg().relu().sum(-1).mean()


def drop_parallel_grad_(w: Tensor) -> None:
    """Remove from ``w.grad`` its component along each (unit) row of ``w [F, d]``, so a step
    does not fight the unit-norm constraint."""
    if w.grad is not None:
        w.grad -= (w.grad * w).sum(-1, keepdim=True) * w


@dataclass(frozen=True)
class Schedule:
    """Adam steps over ``epochs`` passes of the data with a linear L1 warm-up over the first
    ``warmup`` fraction of steps and a linear learning-rate decay over the last ``decay``
    fraction."""

    steps: int
    lr: float
    warmup: float = 0.1
    decay: float = 0.2

    def l1_factor(self, step: int) -> float:
        n = max(1, int(self.warmup * self.steps))
        return min(1.0, (step + 1) / n)

    def lr_at(self, step: int) -> float:
        start = int((1 - self.decay) * self.steps)
        if step < start:
            return self.lr
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - start))


def adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(list(params), lr=lr, betas=(0.9, 0.999), foreach=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Reconstruction:
    """Streaming (float64) sums for MSE and fraction of variance explained of ``pred`` vs
    ``target`` rows: FVE = 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (ȳ: the mean row over everything seen)."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sum: Tensor | None = None
        self.sum_sq = 0.0

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``, ``target``: ``[..., d]`` rows."""
        p, y = (
            pred.reshape(-1, pred.shape[-1]).double(),
            target.reshape(-1, target.shape[-1]).double(),
        )
        self.n += y.shape[0]
        self.sq_err += float((p - y).pow(2).sum())
        s = y.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq += float(y.pow(2).sum())

    @property
    def mse(self) -> float:
        """Mean over rows of ‖y − ŷ‖²."""
        return self.sq_err / max(1, self.n)

    @property
    def fve(self) -> float:
        if self.sum is None or self.n == 0:
            return float("nan")
        total = self.sum_sq - float(self.sum.pow(2).sum()) / self.n
        return 1.0 - self.sq_err / max(total, 1e-30)


def causal_mask(T: int, device: torch.device, window: int | None = None) -> Tensor:
    """``[T, T]`` bool, True where query t may attend to key s (s <= t, within the window)."""
    t = torch.arange(T, device=device)
    keep = t[None, :] <= t[:, None]
    if window is not None:
        keep &= t[None, :] > t[:, None] - window
    return keep
