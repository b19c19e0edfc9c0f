"""All-heads ablation against plain forward passes on the same tokens.

Ablates every head of the model one at a time (``ablate_heads`` with ``heads=None``: one clean
pass, then batched passes that start at each head's layer) and, in the same run, times as many
plain forward passes with logits (``model(input_ids)``) over the same tokens as there are heads,
in batches of the same size. Prints both wall and CPU times (the process's own CPU time is the
steadier measure on a shared machine), their ratios, and the heads with the largest effect.

    .venv/bin/python benchmarks/ablate.py                        # 32 sequences x 256 tokens
    .venv/bin/python benchmarks/ablate.py --sequences 4 --seq-len 64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from headscope.analysis.ablate import ablate_heads, format_text
from headscope.analysis.synthetic import repeated_random_tokens
from headscope.data.corpus import ensure_default_corpus
from headscope.model import ModelAdapter
from headscope.precompute.sequences import iter_sequences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--method", choices=["zero", "mean", "resample"], default="zero")
    p.add_argument("--data", choices=["corpus", "repeated"], default="corpus")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument(
        "--plain-passes",
        type=int,
        default=None,
        help="plain passes to time (default: one per head); fewer are scaled up to one per head",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (on a shared, loaded machine 1 is much faster than 2)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ad = ModelAdapter.load(args.model, device=args.device, dtype=dtype)
    if args.data == "corpus":
        seqs = iter_sequences(
            ad.tokens, ensure_default_corpus(), args.seq_len, limit=args.sequences
        )
        tokens = torch.stack([s.ids for s in seqs]).to(args.device)
    else:
        half = (args.seq_len - 1) // 2
        tokens = repeated_random_tokens(ad, args.sequences, half).tokens.to(args.device)
    n_heads = ad.spec.n_heads_total
    n_plain = args.plain_passes or n_heads
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def plain() -> None:
        for a in range(0, tokens.shape[0], args.batch_size):
            ad.model(input_ids=tokens[a : a + args.batch_size], use_cache=False)

    with torch.no_grad():  # warm-up, not counted
        plain()
        ablate_heads(ad, tokens[:2, :16], ["L0H0"], method=args.method)
    sync()
    print(f"timing the ablation of {n_heads} heads ...", file=sys.stderr, flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result = ablate_heads(ad, tokens, method=args.method, batch_size=args.batch_size)
    sync()
    t_ablate, c_ablate = time.perf_counter() - t0, time.process_time() - c0
    print(f"{t_ablate:.1f} s; timing {n_plain} plain passes ...", file=sys.stderr, flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for _ in range(n_plain):
            plain()
    sync()
    t_plain = (time.perf_counter() - t0) * n_heads / n_plain
    c_plain = (time.process_time() - c0) * n_heads / n_plain

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, load average {load:.1f}"
    )
    print(
        f"model {ad.name} ({ad.spec.n_layers} layers x {ad.spec.n_heads} heads), {args.dtype}, "
        f"{args.data} data, {tokens.shape[0]} sequences x {tokens.shape[1]} tokens, "
        f"batch {args.batch_size} rows, device {args.device}, {args.method} ablation"
    )
    scaled = "" if n_plain == n_heads else f" (measured {n_plain}, scaled to {n_heads})"
    print(f"{'':<40} {'wall s':>9} {'CPU s':>9}")
    print(f"{f'all-heads ablation ({n_heads} heads)':<40} {t_ablate:9.2f} {c_ablate:9.2f}")
    print(f"{f'{n_heads} plain forward passes{scaled}':<40} {t_plain:9.2f} {c_plain:9.2f}")
    print(f"{'ratio ablation / plain':<40} {t_ablate / t_plain:9.3f} {c_ablate / c_plain:9.3f}")
    print()
    print(format_text(result, limit=10))


if __name__ == "__main__":
    main()
