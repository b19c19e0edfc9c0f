"""Where residual-dictionary training time goes: the model's forward pass vs the SAE steps.

Captures the residual stream entering every layer of the model in one pass per batch (the
activation stream ``train_sites`` reads), timed alone; then trains one SAE per layer in lockstep
on the captured rows (no model), timed alone. Prints seconds per 1k tokens for each, their
shares, and the same for the options that change them (model dtype, SAE batch size, threads).
Both wall and CPU time: the process's CPU time is the steadier measure on a shared machine.

    .venv/bin/python benchmarks/dictionaries.py                      # 8 x 256 tokens, all layers
    .venv/bin/python benchmarks/dictionaries.py --threads 1 --dtypes fp32 --sae-batch 256
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from headscope.data.corpus import ensure_default_corpus
from headscope.dictionaries.activations import iter_activations
from headscope.dictionaries.sae import SAEConfig
from headscope.dictionaries.train import train_saes
from headscope.model import ModelAdapter


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--sequences", type=int, default=8, help="sequences of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--sae-batch", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--n-features", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch CPU threads to time (on a busy machine 1 is often faster than 2)",
    )
    args = p.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    corpus = ensure_default_corpus()
    rows: dict[str, torch.Tensor] | None = None
    forward: dict[tuple[str, int], tuple[float, float]] = {}
    n_rows = 0
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        ad = ModelAdapter.load(args.model, dtype=dtype)
        layers = args.layers if args.layers is not None else list(range(ad.spec.n_layers))
        sites = [("resid", (layer,)) for layer in layers]
        n_tokens = args.sequences * (args.seq_len - 1)
        stream_kw = {"n_tokens": n_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size}
        for _ in iter_activations(ad, corpus, sites, n_tokens=args.batch_size * 16, seq_len=16):
            pass  # warm-up, not counted
        for threads in args.threads:
            torch.set_num_threads(threads)
            t = _clock()
            chunks = list(iter_activations(ad, corpus, sites, **stream_kw))
            forward[(dtype_name, threads)] = _since(t)
            wall, cpu = forward[(dtype_name, threads)]
            print(
                f"forward pass {dtype_name}, {threads} thread(s): {wall:.1f} s wall, {cpu:.1f} s CPU",
                flush=True,
            )
            got = sum(next(iter(c.values())).shape[0] for c in chunks)
            if rows is None:
                n_rows = got
                rows = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
        del ad
    assert rows is not None
    d_in = next(iter(rows.values())).shape[1]
    print(
        f"stream: {len(rows)} residual layers x {n_rows:,} rows (BOS left out) of "
        f"{args.sequences} x {args.seq_len} tokens, {args.batch_size} sequences per pass"
    )

    sae_time: dict[tuple[int, int], tuple[float, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for sae_batch in args.sae_batch:
            cfgs = {
                key: SAEConfig(
                    d_in=d_in,
                    d_sae=args.n_features,
                    k=args.k,
                    normalize_activations="expected_average_only_in",
                )
                for key in rows
            }
            # at least 4 steps; rows are reused when the stream is shorter
            n_train = max(n_rows // sae_batch, 4) * sae_batch
            reps = -(-n_train // n_rows)
            t = _clock()
            train_saes(
                iter([{k: v.repeat(reps, 1)[:n_train] for k, v in rows.items()}]),
                cfgs,
                n_tokens=n_train,
                batch_size=sae_batch,
                buffer_size=n_train,
                n_eval=0,
                log=None,
            )
            wall, cpu = _since(t)
            # per 1k of the stream's rows, so it compares with the forward pass's figure
            sae_time[(threads, sae_batch)] = (wall * n_rows / n_train, cpu * n_rows / n_train)

    per_k = 1000 / n_rows
    print(
        f"\nseconds per 1k tokens (wall / CPU), {len(rows)} layers, load {os.getloadavg()[0]:.2f}"
    )
    for (dtype_name, threads), (wall, cpu) in forward.items():
        print(
            f"  forward pass {dtype_name:>4}, {threads} thread(s): "
            f"{wall * per_k:7.3f} / {cpu * per_k:7.3f}"
        )
    for (threads, sae_batch), (wall, cpu) in sae_time.items():
        print(
            f"  SAE steps, batch {sae_batch:>5}, {threads} thread(s): "
            f"{wall * per_k:7.3f} / {cpu * per_k:7.3f}"
        )
    print("\nsplit (forward pass share of forward + SAE steps, wall):")
    for (dtype_name, f_threads), (f_wall, _) in forward.items():
        for (threads, sae_batch), (s_wall, _) in sae_time.items():
            if threads != f_threads:
                continue
            total = f_wall + s_wall
            print(
                f"  {dtype_name:>4} forward + SAE batch {sae_batch:>5}, {threads} thread(s): "
                f"forward {f_wall / total:5.1%}, SAE {s_wall / total:5.1%}, "
                f"{total * per_k:.3f} s per 1k tokens ({n_rows / total:,.0f} tok/s)"
            )


if __name__ == "__main__":
    main()
