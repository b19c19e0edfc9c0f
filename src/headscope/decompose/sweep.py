"""(L0, MSE, FVE) curves of the MTC and its two baselines: each variant trained at each sparsity
setting on the same layer, the same contexts and the same width.

"Progress on Attention" compares the MTC, the single-head MTC and the jointly trained SAE +
single-head MTC as curves in (L0, MSE), not single points: one variant can win at low L0 and
lose at high L0. In this trainer the L1 coefficient on source activations sets L0 (the moved
top-k only caps how many features a context may move), so the sweep is over L1: a larger
coefficient gives a smaller L0.
"""

from __future__ import annotations

import time
from typing import Any

from headscope.decompose.common import Log, no_log
from headscope.decompose.data import LayerData
from headscope.decompose.mtc import VARIANTS, Variant
from headscope.decompose.mtc_train import train_mtc
from headscope.decompose.results import MTCSweep
from headscope.errors import InputError

DEFAULT_L1S: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)


def mtc_sweep(
    train: LayerData,
    eval_data: LayerData,
    *,
    l1s: tuple[float, ...] = DEFAULT_L1S,
    variants: tuple[Variant, ...] = ("mtc", "single_head", "sae_mtc"),
    log: Log = no_log,
    **options: Any,
) -> MTCSweep:
    """Train every variant at every L1 in ``l1s`` with the same ``options`` (see
    :func:`train_mtc`; ``seed`` included, so every point starts from the same weights) and
    report one :class:`MTCStats` row per (variant, L1), variants in order, L1 ascending."""
    if not l1s:
        raise InputError("give at least one L1 coefficient")
    if any(not l1 >= 0 for l1 in l1s):
        raise InputError(f"L1 coefficients must be >= 0, got {list(l1s)}")
    if not variants or any(v not in VARIANTS for v in variants):
        raise InputError(f"variants must be some of {VARIANTS}, got {list(variants)}")
    if "l1" in options or "variant" in options:
        raise InputError("the sweep sets l1 and variant itself")
    t0 = time.perf_counter()
    values = sorted(float(x) for x in l1s)
    rows = []
    for variant in variants:
        for l1 in values:
            _, stats = train_mtc(train, eval_data, variant=variant, l1=l1, **options)
            log(
                f"{variant} l1 {l1:g}: L0 {stats.l0:.1f} FVE {stats.fve:.3f} ({stats.seconds:.0f} s)"
            )
            rows.append(stats)
    kept = {k: v for k, v in options.items() if isinstance(v, int | float | str) and k != "log"}
    return MTCSweep(
        layer=train.layer,
        target=str(options.get("target", "attn_out")),
        setting="l1",
        values=values,
        options=kept,
        train_tokens=train.n_tokens,
        eval_tokens=eval_data.n_tokens,
        rows=rows,
        seconds=time.perf_counter() - t0,
    )


def format_sweep(sweep: MTCSweep) -> str:
    """The sweep as a text table, one block per variant."""
    opts = ", ".join(f"{k} {v}" for k, v in sorted(sweep.options.items()))
    lines = [
        f"(L0, FVE) sweep over L1, layer {sweep.layer}, target {sweep.target} ({opts}); "
        f"{sweep.train_tokens:,} train / {sweep.eval_tokens:,} held-out tokens; "
        f"{sweep.seconds:.0f} s in all",
        f"{'variant':<12} {'L1':>8} {'L0':>7} {'moved L0':>8} {'MSE':>10} {'FVE':>7} "
        f"{'dead':>6} {'seconds':>8}",
    ]
    for r in sweep.rows:
        extra = f"  (SAE FVE {r.sae_fve:.3f})" if r.sae_fve is not None else ""
        lines.append(
            f"{r.variant:<12} {r.l1:>8.2g} {r.l0:>7.1f} {r.moved_l0:>8.1f} {r.mse:>10.4g} "
            f"{r.fve:>7.3f} {r.dead_fraction:>6.2f} {r.seconds:>8.1f}{extra}"
        )
    return "\n".join(lines)
