"""Precompute throughput against the plain forward pass on the same tokens, and where the
whole command's time goes.

First the whole ``headscope precompute`` command runs in a child process with the same settings,
timed from process start to exit (with its peak RSS); its per-phase times come from the run's
manifest: start-up (imports, reading the data's first lines), model load, the stream, and each
step after it (probes, the metrics files, motifs, PCA, top tokens, the head files, the rest).
Then, in this process, for every batch, in turn: (a) the plain forward pass with logits (``model(input_ids)``, fused
SDPA), (b) the plain forward pass of the base model without the unembedding (the part the
precompute also runs), and (c) the precompute's streaming pass (patterns of every layer reduced
into every metric, example, top-token, PCA and motif accumulator). Interleaving the three on
each batch keeps drifts of the machine's speed out of the ratios. Prints tokens/s of each and
the ratios, overall and per quarter of the run: the first batches cost the precompute more
(every head keeps every sequence until its example buckets and top-N pairs fill up).

    .venv/bin/python benchmarks/precompute.py --dtype bf16 --sequences 256

``--command-only`` times only the whole command; ``--compare SRC`` first runs the same command
on another checkout's ``src`` folder (the code before a change) and prints the two phase tables
side by side; ``--cold-probes`` gives each command an empty probe cache (the first run of a
model), the other cache folders shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from headscope.data.corpus import ensure_default_corpus
from headscope.model import ModelAdapter
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.runner import process_batch, query_block_for
from headscope.precompute.sequences import batched, iter_sequences
from headscope.precompute.state import StreamState


def _cold_cache(tmp: Path) -> Path:
    """A cache folder whose probe cache is empty; every other entry links to the real one."""
    from headscope.model.loading import cache_dir

    real, cold = cache_dir(), tmp / "cache"
    cold.mkdir()
    for entry in real.iterdir() if real.is_dir() else []:
        if entry.name != "probes":
            (cold / entry.name).symlink_to(entry)
    return cold


def run_command(args: argparse.Namespace, src: str | None = None) -> dict:
    """Run ``headscope precompute`` in a child process (on the package in ``src``, else this
    one); wall time, peak RSS and the manifest's timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if args.cold_probes:
            env["HEADSCOPE_CACHE"] = str(_cold_cache(Path(tmp)))
        cmd = [
            sys.executable,
            *("-m", "headscope", "precompute"),
            "--json",
            *("--model", args.model, "--dtype", args.dtype, "--device", args.device),
            *("--sequences", str(args.sequences), "--seq-len", str(args.seq_len)),
            *("--batch-size", str(args.batch_size), "--out", str(out)),
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t0
        # the largest child so far (with --compare: of both commands)
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": wall, "rss_mb": rss_mb, "timings": manifest["timings"]}


def phase_table(command: dict, n_tokens: int) -> list[tuple[str, float]]:
    """(phase, seconds) of the whole command, in order; they add up to its wall time."""
    t = command["timings"]
    after = ("probes", "metrics_files", "motifs", "pca", "top_tokens", "head_files")
    rows = [
        ("start-up (imports, data check)", command["wall_s"] - t["load_s"] - t["total_s"]),
        ("model load", t["load_s"]),
        (f"stream ({n_tokens} tokens)", t["stream_s"]),
        ("between (checkpoint, merge)", t["total_s"] - t["stream_s"] - t["finalize_s"]),
    ]
    rows += [(f"after: {name.replace('_', ' ')}", t.get(f"{name}_s", 0.0)) for name in after]
    rest = t["finalize_s"] - sum(t.get(f"{name}_s", 0.0) for name in after)
    rows.append(("after: rest (vocab, manifest)", rest))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-command", action="store_true", help="skip timing the whole command")
    p.add_argument(
        "--command-only",
        action="store_true",
        help="only time the whole command (no per-batch part)",
    )
    p.add_argument("--compare", metavar="SRC", help="also run the command on this src folder")
    p.add_argument("--cold-probes", action="store_true", help="an empty probe cache per command")
    args = p.parse_args()
    before = run_command(args, args.compare) if args.compare and not args.no_command else None
    command = None if args.no_command else run_command(args)
    if args.command_only:
        if command is not None:
            print_command(args, command, before)
        return
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ad = ModelAdapter.load(args.model, device=args.device, dtype=dtype)
    seqs = list(
        iter_sequences(ad.tokens, ensure_default_corpus(), args.seq_len, limit=args.sequences)
    )
    batches = list(batched(iter(seqs), args.batch_size))
    cfg = PrecomputeConfig(
        model=args.model, dtype=args.dtype, seq_len=args.seq_len, batch_size=args.batch_size
    )
    layers = list(range(ad.spec.n_layers))
    # as the command does: whole layers, or blocks of query rows for long sequences
    block = query_block_for(args.batch_size, ad.spec.n_heads, args.seq_len)
    cuda = args.device.startswith("cuda")

    def ids(b):
        return torch.stack([s.ids for s in b]).to(args.device)

    def timed(fn, b) -> float:
        t0 = time.perf_counter()
        fn(b)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def full(b):
        ad.model(input_ids=ids(b), use_cache=False)

    def base(b):
        ad.model.base_model(input_ids=ids(b), use_cache=False)

    state = StreamState(ad.spec, cfg)

    def pre(b):
        process_batch(ad, state, layers, b, block)

    with torch.no_grad():  # warm-up on the first batch, not counted (a throwaway state)
        full(batches[0])
        base(batches[0])
        process_batch(ad, StreamState(ad.spec, cfg), layers, batches[0], block)
    rows = []  # (tokens, plain s, base s, precompute s) per batch
    with torch.no_grad():
        for b in batches:
            n = sum(s.ids.shape[0] for s in b)
            rows.append((n, timed(full, b), timed(base, b), timed(pre, b)))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"model {args.model}, {args.dtype}, {args.sequences} sequences x {args.seq_len} tokens, batch {args.batch_size}, device {args.device}"
    )

    def report(label: str, part: list[tuple[int, float, float, float]]) -> None:
        n = sum(r[0] for r in part)
        t_full, t_base, t_pre = (sum(r[i] for r in part) for i in (1, 2, 3))
        print(
            f"{label:<24} plain {n / t_full:7.1f} tok/s   base {n / t_base:7.1f} tok/s   "
            f"precompute {n / t_pre:7.1f} tok/s   ratio vs plain {t_full / t_pre:.3f}   "
            f"vs base {t_base / t_pre:.3f}"
        )

    quarter = max(1, len(rows) // 4)
    done = 0
    for i in range(0, len(rows), quarter):
        part = rows[i : i + quarter]
        seqs_in = sum(len(b) for b in batches[i : i + quarter])
        report(f"sequences {done + 1}-{done + seqs_in}", part)
        done += seqs_in
    report("whole run", rows)
    t_full, t_pre = sum(r[1] for r in rows), sum(r[3] for r in rows)
    print(f"ratio precompute / plain forward:  {t_full / t_pre:.3f}")
    if command is None:
        return
    n = sum(r[0] for r in rows)
    t_base = sum(r[2] for r in rows)
    wall = command["wall_s"]
    print(
        f"\nwhole command (process start to exit): {wall:.1f} s, {n / wall:.1f} tok/s, "
        f"peak RSS {command['rss_mb']:.0f} MB; ratio vs plain forward {t_full / wall:.3f}, "
        f"vs base forward {t_base / wall:.3f}"
    )
    print_command(args, command, before)


def print_command(args: argparse.Namespace, command: dict, before: dict | None) -> None:
    """The whole command's phases (and, with ``--compare``, the other checkout's beside them)."""
    n = args.sequences * args.seq_len
    runs = [("before", before), ("this", command)] if before else [("this", command)]
    tables = [(label, dict(phase_table(c, n)), c["wall_s"]) for label, c in runs]
    print(
        f"\nwhole command, {args.sequences} x {args.seq_len} tokens, {args.dtype}, probes "
        f"{'cold' if args.cold_probes else 'as cached'}; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(f"  {'phase':<34}" + "".join(f"{label:>10}" for label, _, _ in tables))
    for name in tables[0][1]:
        print(f"  {name:<34}" + "".join(f"{t[name]:9.2f}s" for _, t, _ in tables))
    after = [sum(v for k, v in t.items() if k.startswith("after")) for _, t, _ in tables]
    print(f"  {'after the stream, in all':<34}" + "".join(f"{a:9.2f}s" for a in after))
    print(f"  {'whole command':<34}" + "".join(f"{w:9.2f}s" for _, _, w in tables))


if __name__ == "__main__":
    main()
