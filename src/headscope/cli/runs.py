"""Subcommands that make, serve, convert and compare runs."""

from __future__ import annotations

from pathlib import Path

from headscope.cli.common import (
    MAX_TOKENS_HELP,
    adapter,
    command,
    data_args,
    dtype_name,
    emit,
    model_args,
)
from headscope.errors import InputError
from headscope.limits import MAX_TOKENS

_POSITIONAL_HELP = {
    "run": "run folder",
    "out": "output folder (absent or empty)",
    "tree": "HeadVis data tree (a folder)",
}


def per_layer_text(values: tuple | list) -> str:
    """A per-layer setting in a line: runs of equal layers, ``None`` as full causal attention,
    e.g. ``layers 0-4: 512, layer 5: full`` or ``all 30 layers: full``."""
    shown = ["full" if v is None else str(v) for v in values]
    if len(set(shown)) == 1 and len(shown) > 1:
        return f"all {len(shown)} layers: {shown[0]}"
    runs: list[str] = []
    start = 0
    for i in range(1, len(shown) + 1):
        if i == len(shown) or shown[i] != shown[start]:
            where = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            runs.append(f"{where}: {shown[start]}")
            start = i
    return ", ".join(runs)


def info(args):
    info = adapter(args).info()
    lines = [
        f"{k:>18}: {per_layer_text(v) if k == 'sliding_window' and isinstance(v, (list, tuple)) else v}"
        for k, v in info.items()
    ]
    emit(args, info, "\n".join(lines))


def _precompute(args):
    from headscope.precompute.config import PrecomputeConfig
    from headscope.precompute.runner import run_precompute
    from headscope.store import open_run

    cfg = PrecomputeConfig(
        model=args.model,
        data=args.data,
        text_field=args.text_field,
        sequences=None if args.tokens else args.sequences,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype=dtype_name(args),
        device=args.device,
        layers=tuple(args.layers) if args.layers else None,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        query_block=args.query_block,
    )
    out = run_precompute(cfg, Path(args.out), progress=not args.json)
    run = open_run(out)
    m = run.metrics
    lines = [
        f"run: {out}  ({len(m)} heads, {run.manifest['tokens']['tokens']} tokens, "
        f"{run.manifest['timings']['total_s']:.0f} s)",
        "top heads per metric:",
    ]
    for col in m.columns[3:]:
        top = m.nlargest(3, col)
        tops = ", ".join(f"{n} {v:.3f}" for n, v in zip(top["name"], top[col], strict=True))
        lines.append(f"{col:>24}: {tops}")
    emit(args, run.manifest, "\n".join(lines))


def _serve(args):
    from headscope.server.serve import serve

    serve(
        args.run,
        args.model,
        host=args.host,
        port=args.port,
        token=args.token,
        dictionaries=args.dictionaries,
        max_tokens=args.max_tokens,
        block=True,
    )


def _demo(args):
    from headscope.demo import demo

    demo(
        Path(args.out) if args.out else None,
        host=args.host,
        port=args.port,
        serve=not args.no_serve,
        sequences=args.sequences,
        seq_len=args.seq_len,
    )


def _export_static(args):
    from headscope.store.static import export_static

    out = export_static(args.run, args.out)
    emit(args, {"out": str(out)}, f"static site written to {out} (serve it with any web server)")


def _export_headvis(args):
    from headscope.store.headvis import export_headvis

    out = export_headvis(Path(args.run), Path(args.out))
    emit(args, {"out": str(out)}, f"HeadVis tree written to {out}")


def _import_headvis(args):
    from headscope.store.headvis import import_headvis

    out = import_headvis(Path(args.tree), Path(args.run))
    emit(args, {"run": str(out)}, f"imported {args.tree} as run {out}")


def _compare(args):
    from headscope.store.compare import compare_run, format_text

    result = compare_run(args.run, args.summary, top=args.top)
    text = format_text(result)
    if args.add_columns:
        from headscope.store.compare import add_reference_columns

        cols = add_reference_columns(args.run, args.summary)
        text += f"\nadded {', '.join(cols)} to the run's metrics (the app's scatter can plot them)"
    emit(args, result, text)


def _motifs_fit(args):
    from headscope.precompute.motif_space import fit_space

    out = fit_space(args.runs, args.out)
    emit(args, {"space": str(out)}, f"motif space fitted on {len(args.runs)} runs: {out}")


def _motifs_map(args):
    from headscope.files import write_json
    from headscope.precompute.motif_space import map_across

    if args.save:
        from headscope.precompute.motif_space import write_across

        files = write_across(args.runs, space=args.space)
        emit(
            args,
            {"written": [str(f) for f in files]},
            "\n".join(
                ["the joint head map (every method and neighbourhood) for the app's similar tab:"]
                + [f"  {f}" for f in files]
            ),
        )
        return
    m = map_across(args.runs, space=args.space, method=args.method, n_neighbors=args.neighbors)
    if args.out:
        write_json(args.out, m.model_dump())
    text = "\n".join(
        f"{x:+8.3f} {y:+8.3f}  {h}" for h, (x, y) in zip(m.heads, m.coords, strict=True)
    )
    emit(args, m, text + (f"\nwritten to {args.out}" if args.out else ""))


def _similar(args):
    from headscope.precompute.motif_space import similar_across

    run_a, sep, head = args.head.rpartition(":")
    if not sep:
        raise InputError(f"{args.head!r}: write RUN_A:HEAD, e.g. runs/smollm2:L18H6")
    r = similar_across(run_a, head, args.run_b, space=args.space, top=args.top)
    lines = [
        f"heads of {r.run_b} nearest to {r.head} of {r.run_a} (energy distance in one motif space):"
    ]
    lines += [f"  {n.head:>8}  {n.distance:.4f}" for n in r.nearest]
    emit(args, r, "\n".join(lines))


def _corpus_build(args):
    from headscope.data.corpus import build_corpus, default_corpus_path, format_stats

    stats = build_corpus(Path(args.out) if args.out else default_corpus_path())
    emit(args, stats.to_dict(), format_stats(stats))


def add_run_commands(sub) -> None:
    sp = command(
        sub, "precompute", _precompute, "stream a dataset through the model, record every head"
    )
    model_args(sp)
    data_args(sp)
    sp.add_argument("--out", required=True, help="run folder (an interrupted run resumes)")
    sp.add_argument("--sequences", type=int, default=256, help="packed sequences to read")
    sp.add_argument("--tokens", type=int, help="instead of --sequences: this many tokens")
    sp.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence")
    sp.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    sp.add_argument("--layers", type=int, nargs="*", help="layers to record (default: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the example reservoirs")
    sp.add_argument("--checkpoint-every", type=int, default=8, help="batches between checkpoints")
    sp.add_argument(
        "--query-block",
        type=int,
        default=None,
        help="query rows per block of a layer's patterns, for long sequences (default: whole "
        "layers while a batch's patterns fit 256 MB, blocks beyond)",
    )

    sp = command(sub, "serve", _serve, "serve the browser app, a run and the live API")
    sp.add_argument("run", nargs="?", help="run folder (optional)")
    sp.add_argument(
        "--model", help="model for live analysis (default: none, precomputed views only)"
    )
    sp.add_argument(
        "--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)"
    )
    sp.add_argument("--port", type=int, default=8765, help="port to serve on")
    sp.add_argument("--token", help="access token (generated when --host is not local)")
    sp.add_argument(
        "--dictionaries", help="residual SAEs for the feature basis (default: RUN/dictionaries)"
    )
    sp.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=MAX_TOKENS_HELP)

    sp = command(
        sub, "demo", _demo, "corpus + precompute + attributions on the default model, then serve"
    )
    sp.add_argument("--out", help="run folder (default: in $HEADSCOPE_CACHE)")
    sp.add_argument("--host", default="127.0.0.1", help="bind address")
    sp.add_argument("--port", type=int, default=8765, help="port to serve on")
    sp.add_argument("--sequences", type=int, default=64, help="packed sequences to precompute")
    sp.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    sp.add_argument("--no-serve", action="store_true", help="build the demo run and exit")

    for name, handler, help_, first, second in (
        ("export static", _export_static, "the app + a run as a static site", "run", "out"),
        ("export headvis", _export_headvis, "a run as a HeadVis data tree", "run", "out"),
        (
            "import headvis",
            _import_headvis,
            "a HeadVis data tree (e.g. Neuronpedia's) as a run",
            "tree",
            "run",
        ),
    ):
        sp = command(sub, name, handler, help_)
        for arg in (first, second):
            sp.add_argument(arg, help=_POSITIONAL_HELP[arg])
        sp.add_argument("--json", action="store_true", help="print JSON")

    sp = command(
        sub,
        "compare",
        _compare,
        "rank-correlate a run's head metrics with a published per-model summary (e.g. Neuronpedia's)",
    )
    sp.add_argument("run", help="run folder")
    sp.add_argument("summary", help="summary JSON: a config and per-metric [layer][head] grids")
    sp.add_argument("--top", type=int, default=5, help="most-disagreeing heads to list per metric")
    sp.add_argument(
        "--add-columns",
        action="store_true",
        help="also add the summary's metrics to the run's table as ref:<metric> columns",
    )
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = command(sub, "motifs fit", _motifs_fit, "fit one motif space on the patterns of runs")
    sp.add_argument("runs", nargs="+", help="run folders (any models)")
    sp.add_argument("--out", required=True, help="the space's file (.safetensors)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = command(sub, "motifs map", _motifs_map, "every head of several runs on one 2-D map")
    sp.add_argument("runs", nargs="+", help="run folders (any models)")
    sp.add_argument("--space", help="a fitted motif space (default: fitted on these runs)")
    sp.add_argument(
        "--method",
        choices=["isomap", "tsne", "umap"],
        default="isomap",
        help="2-D embedding (umap needs umap-learn installed)",
    )
    sp.add_argument("--neighbors", type=int, default=16, help="neighbourhood size / perplexity")
    sp.add_argument("--out", help="write the map as JSON here")
    sp.add_argument(
        "--save",
        action="store_true",
        help="write motifs/across.json into each run (every method and neighbourhood, and each "
        "head's nearest heads in the other runs) for the app's similar-heads tab",
    )
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = command(sub, "similar", _similar, "the heads of one run nearest to a head of another")
    sp.add_argument("head", metavar="RUN_A:HEAD", help="e.g. runs/smollm2:L18H6")
    sp.add_argument("run_b", metavar="RUN_B", help="the run (model) to search")
    sp.add_argument("--space", help="a fitted motif space (default: fitted on the two runs)")
    sp.add_argument("--top", type=int, default=10, help="heads to list")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = command(
        sub,
        "corpus build",
        _corpus_build,
        "assemble the default multi-domain corpus from installed packages",
    )
    sp.add_argument(
        "--out", help="output folder (default: in $HEADSCOPE_CACHE, see docs/corpus.md)"
    )
    sp.add_argument("--json", action="store_true", help="print JSON")
