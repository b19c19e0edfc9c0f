"""Attention decompositions of one layer of the default model, at a small size, with wall times.

Captures one layer over packed corpus contexts once, then prints:

1. multi-token transcoders: (L0, MSE, FVE) of the MTC, the single-head MTC and the jointly
   trained SAE + single-head MTC at the same settings, and the k-means cluster sizes of the
   MTC's head loadings;
2. QK diagonalisation of one head: pattern reconstruction (KL, top-1 key, pattern FVE)
   against the number of active QK features, over a sweep of L1 (rank 1, softmax), plus one
   high-rank and one linear model, and the top features of the sparsest good one;
3. a head split of a polysemantic head: output FVE as k grows, and what each sub-head handles.

Heads are chosen from the captured patterns (printed): each query row's most-attended key is
classed as BOS, self, previous token or other; the QK head is the one with the largest "other"
share (content-based attention), the split head the one whose classes are most mixed (highest
entropy among the rows where it writes the most), i.e. the most visibly polysemantic.

    .venv/bin/python benchmarks/decompose.py                      # layer 15, 160 contexts x 128
    .venv/bin/python benchmarks/decompose.py --contexts 48 --epochs 2 --cache /tmp/L15
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from headscope.data.corpus import ensure_default_corpus
from headscope.decompose import (
    LayerData,
    capture_layer,
    compare_mtcs,
    contexts_from_rows,
    format_comparison,
    format_qk_features,
    format_qk_table,
    format_split,
    head_target,
    load_layer_data,
    qk_report,
    qk_sweep,
    save_layer_data,
    split_sweep,
    train_qk,
)
from headscope.model import ModelAdapter
from headscope.precompute.sequences import iter_sequences

CLASSES = ("BOS", "self", "prev", "other")


def behaviours(data: LayerData, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[H, 4]`` share of query rows (>= 2) whose most-attended key is BOS / self / previous /
    other, rows weighted by ``weight [H, N, T]`` (default 1)."""
    top = data.pattern[:, :, 2:].argmax(-1)  # [N, H, T-2]
    t = torch.arange(2, data.n_ctx)
    cls = torch.full_like(top, 3)
    cls[top == t - 1] = 2
    cls[top == t] = 1
    cls[top == 0] = 0
    w = torch.ones(top.shape) if weight is None else weight.permute(1, 0, 2)[:, :, 2:]
    out = torch.zeros(data.pattern.shape[1], 4)
    for c in range(4):
        out[:, c] = ((cls == c).float() * w).sum((0, 2))
    return out / out.sum(-1, keepdim=True)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--contexts", type=int, default=160, help="packed corpus contexts")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval", type=int, default=32, help="contexts held out for evaluation")
    p.add_argument("--n-features", type=int, default=512, help="MTC features")
    p.add_argument("--k-moved", type=int, default=128, help="MTC features moved per context")
    p.add_argument("--l1", type=float, default=1e-3, help="MTC L1 coefficient")
    p.add_argument("--epochs", type=int, default=6, help="MTC epochs")
    p.add_argument("--qk-features", type=int, default=128)
    p.add_argument("--qk-epochs", type=int, default=8)
    p.add_argument("--qk-l1", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--split-ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--split-epochs", type=int, default=4)
    p.add_argument("--split-weight", type=float, default=0.1, help="simplicity penalty")
    p.add_argument("--split-exclusive", type=float, default=0.03, help="exclusivity penalty")
    p.add_argument("--split-routed", type=float, default=0.5, help="routed share of steps")
    p.add_argument("--qk-head", type=int, help="default: chosen from the patterns")
    p.add_argument("--split-head", type=int, help="default: chosen from the patterns")
    p.add_argument("--cache", help="folder to keep the captured layer in (reused when present)")
    p.add_argument("--out", help="folder to save the trained decompositions in")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    ad = ModelAdapter.load(args.model, device=args.device)
    cache = Path(args.cache) if args.cache else None
    if cache is not None and (cache / "layer.json").is_file():
        data = load_layer_data(cache, device=args.device)
        times["load cached capture"] = time.perf_counter() - t0
    else:
        seqs = iter_sequences(ad.tokens, ensure_default_corpus(), args.seq_len, limit=args.contexts)
        ids = contexts_from_rows([s.ids for s in seqs], args.seq_len)
        data = capture_layer(ad, ids, args.layer, device=args.device)
        times["capture"] = time.perf_counter() - t0
        if cache is not None:
            save_layer_data(data, cache)
    train, test = data.split(args.eval)
    L = data.layer
    print(
        f"model {ad.name}, layer {L}: {train.n_contexts} train + {test.n_contexts} eval contexts "
        f"x {data.n_ctx} tokens ({train.n_tokens} + {test.n_tokens} destination tokens); "
        f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )

    # ----- heads: what each one mostly does --------------------------------------------------
    H = data.pattern.shape[1]
    out_norm = torch.stack([head_target(ad, data, [h]).norm(dim=-1) for h in range(H)])  # [H,N,T]
    heavy = (out_norm >= out_norm.flatten(1).median(-1).values[:, None, None]).float()
    beh = behaviours(data)
    beh_heavy = behaviours(data, heavy)
    qk_head = args.qk_head if args.qk_head is not None else int(beh[:, 3].argmax())
    split_head = (
        args.split_head if args.split_head is not None else int(entropy(beh_heavy).argmax())
    )
    print("\nmost-attended key per query row (all rows | rows with the larger half of output):")
    print(
        f"{'head':>6} "
        + " ".join(f"{c:>6}" for c in CLASSES)
        + "  | "
        + " ".join(f"{c:>6}" for c in CLASSES)
        + "  entropy"
    )
    for h in range(H):
        mark = (" <- QK" if h == qk_head else "") + (" <- split" if h == split_head else "")
        print(
            f"  L{L}H{h} "
            + " ".join(f"{v:>6.2f}" for v in beh[h].tolist())
            + "  | "
            + " ".join(f"{v:>6.2f}" for v in beh_heavy[h].tolist())
            + f"  {float(entropy(beh_heavy[h])):.3f}{mark}"
        )

    # ----- 1. multi-token transcoders --------------------------------------------------------
    t = time.perf_counter()
    comparison, mtcs = compare_mtcs(
        train,
        test,
        n_features=args.n_features,
        k_moved=args.k_moved,
        l1=args.l1,
        epochs=args.epochs,
        batch_size=4,
        model_name=ad.name,
        cluster_ks=tuple(k for k in (2, 8, 32, 128) if k <= args.n_features // 4),
    )
    times["MTC x 3"] = time.perf_counter() - t
    print("\n" + format_comparison(comparison))

    # ----- 2. QK diagonalisation -------------------------------------------------------------
    t = time.perf_counter()
    rows, models = qk_sweep(
        train, test, qk_head, l1s=args.qk_l1, n_features=args.qk_features, epochs=args.qk_epochs
    )
    for rank, variant in ((4, "softmax"), (1, "linear")):
        model, stats = train_qk(
            train,
            test,
            qk_head,
            n_features=args.qk_features,
            rank=rank,
            variant=variant,  # type: ignore[arg-type]
            l1=args.qk_l1[min(1, len(args.qk_l1) - 1)],
            l1_product=args.qk_l1[min(1, len(args.qk_l1) - 1)],
            epochs=args.qk_epochs,
        )
        rows.append(stats)
        models.append(model)
    times[f"QK x {len(rows)}"] = time.perf_counter() - t
    print("\n" + format_qk_table(f"L{L}H{qk_head}", rows))
    good = [i for i in range(len(args.qk_l1)) if rows[i].top1 >= 0.5] or [0]
    pick = min(good, key=lambda i: rows[i].l0_pair)
    report = qk_report(models[pick], test, rows[pick], tokens=ad.tokens, n_features=6)
    print(f"(features of the l1={rows[pick].l1:g} model)")
    print(format_qk_features(report, n=6))

    # ----- 3. head splitting -----------------------------------------------------------------
    t = time.perf_counter()
    split_report, splits = split_sweep(
        ad,
        train,
        test,
        [split_head],
        args.split_ks,
        epochs=args.split_epochs,
        weight_penalty=args.split_weight,
        exclusive=args.split_exclusive,
        routed=args.split_routed,
    )
    times[f"split x {len(args.split_ks)}"] = time.perf_counter() - t
    print("\n" + format_split(split_report))

    if args.out:
        from headscope.decompose import save_mtc, save_qk, save_split

        out = Path(args.out)
        for variant, mtc in mtcs.items():
            stats = next(r for r in comparison.rows if r.variant == variant)
            save_mtc(mtc, out / f"mtc_{variant}", stats.model_dump())
        for i, (model, stats) in enumerate(zip(models, rows, strict=True)):
            save_qk(model, out / f"qk_{i}", stats.model_dump())
        for split, stats in zip(splits, split_report.rows, strict=True):
            save_split(split, out / f"split_k{stats.k}", stats.model_dump())
        print(f"\nsaved to {out}")

    times["total"] = time.perf_counter() - t0
    print("\nwall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    assert all(math.isfinite(r.fve) for r in comparison.rows)


if __name__ == "__main__":
    main()
