"""Precompute throughput against the plain forward pass on the same tokens.

Prints tokens/s of (a) the plain forward pass with logits (``model(input_ids)``, fused SDPA),
(b) the plain forward pass of the base model without the unembedding (the part the precompute
also runs), and (c) the precompute's streaming pass (patterns of every layer reduced into every
metric, example, top-token, PCA and motif accumulator), all on the same batches, plus the ratios.

    .venv/bin/python benchmarks/precompute.py --dtype bf16 --sequences 32
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from headscope.data.corpus import ensure_default_corpus
from headscope.model import ModelAdapter
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.runner import _batches, _process_batch
from headscope.precompute.sequences import iter_sequences
from headscope.precompute.state import StreamState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ad = ModelAdapter.load(args.model, device=args.device, dtype=dtype)
    seqs = list(
        iter_sequences(ad.tokens, ensure_default_corpus(), args.seq_len, limit=args.sequences)
    )
    batches = list(_batches(iter(seqs), args.batch_size))
    n_tokens = sum(s.ids.shape[0] for s in seqs)
    warm = torch.stack([s.ids for s in batches[0]]).to(args.device)

    def timed(fn) -> float:
        fn(batches[0])  # warm-up, not counted
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def ids(b):
        return torch.stack([s.ids for s in b]).to(args.device)

    with torch.no_grad():
        ad.model(input_ids=warm, use_cache=False)
        full = timed(lambda b: ad.model(input_ids=ids(b), use_cache=False))
        base = timed(lambda b: ad.model.base_model(input_ids=ids(b), use_cache=False))
    cfg = PrecomputeConfig(
        model=args.model, dtype=args.dtype, seq_len=args.seq_len, batch_size=args.batch_size
    )
    state = StreamState(ad.spec, cfg)
    layers = list(range(ad.spec.n_layers))
    pre = timed(lambda b: _process_batch(ad, state, layers, b))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"model {args.model}, {args.dtype}, {args.sequences} sequences x {args.seq_len} tokens, batch {args.batch_size}, device {args.device}"
    )
    print(f"plain forward (with logits):       {n_tokens / full:8.1f} tok/s")
    print(f"plain forward (base, no unembed):  {n_tokens / base:8.1f} tok/s")
    print(f"precompute stream (every head):    {n_tokens / pre:8.1f} tok/s")
    print(f"ratio precompute / plain forward:  {full / pre:.3f}")
    print(f"ratio precompute / base forward:   {base / pre:.3f}")


if __name__ == "__main__":
    main()
