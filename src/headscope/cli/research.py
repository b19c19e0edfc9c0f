"""Subcommands that train dictionaries and decompositions, and test head descriptions."""

from __future__ import annotations

import sys
from pathlib import Path

from headscope.cli.common import Help, adapter, command, data_args, emit, model_args


def _train_sae(args):
    from headscope.dictionaries.pipeline import format_stats, train_dictionaries
    from headscope.dictionaries.train import TrainStats

    out = train_dictionaries(
        adapter(args),
        Path(args.data) if args.data else None,
        args.site,
        args.layers,
        out=Path(args.out),
        n_features=args.n_features,
        k=args.k,
        n_tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        label_tokens=args.label_tokens,
        text_field=args.text_field,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    lines = [
        f"{key}: {format_stats(TrainStats.from_dict(sae['stats']))}\n  -> {sae['path']}"
        for key, sae in out["saes"].items()
    ]
    emit(args, out, "\n".join(lines))


def _train_resid(args):
    from headscope.dictionaries.background import set_low_priority
    from headscope.dictionaries.layerwise import LayerwiseConfig, format_quality, train_layers

    set_low_priority(args.nice)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.data is None:
        from headscope.data.corpus import ensure_default_corpus

        args.data = str(ensure_default_corpus())
    settings = {
        "n_features": args.n_features,
        "k": args.k,
        "n_tokens": args.tokens,
        "epochs": args.epochs,
        "n_eval": args.n_eval,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "sae_batch_size": args.sae_batch_size,
        "lr": args.lr,
        "label_tokens": args.label_tokens,
        "edges": args.edges,
        "shard_tokens": args.shard_tokens,
        "seed": args.seed,
    }
    cfg = LayerwiseConfig(
        model=args.model,
        data=str(Path(args.data)),
        text_field=args.text_field,
        **{k: v for k, v in settings.items() if v is not None},  # unset: LayerwiseConfig's
    )
    rows = train_layers(
        adapter(args),
        cfg,
        Path(args.out),
        args.layers,
        log=lambda msg: print(msg, file=sys.stderr),
        keep_stream=args.keep_stream,
    )
    emit(args, {"out": args.out, "layers": [r.to_dict() for r in rows]}, format_quality(rows))


def _describe(args):
    from headscope.analysis.describe import describe, describe_examples
    from headscope.analysis.head_stream import head_patterns
    from headscope.analysis.rules import load_rules
    from headscope.files import read_json
    from headscope.operations.text import describe_text
    from headscope.store import open_run

    rules = load_rules(args.rules)
    run = open_run(args.run)
    config = run.manifest["config"]
    n = {"counterexamples": args.counterexamples}
    if args.on == "stored":
        vocab = read_json(run.path / "vocab.json")
        result = describe_examples(run.head(args.head), rules, lambda i: vocab[str(i)], **n)
    else:
        args.model = args.model or config.get("model", "default")
        model = adapter(args)
        if args.on == "examples":
            result = describe_examples(
                run.head(args.head), rules, model.tokens.display, adapter=model, **n
            )
        else:
            from headscope.precompute.config import PrecomputeConfig
            from headscope.precompute.sequences import iter_sequences

            cfg = PrecomputeConfig.from_dict(config)
            if cfg.data is None:
                from headscope.data.corpus import ensure_default_corpus

                data = ensure_default_corpus()
            else:
                data = Path(cfg.data)
            limit = min(args.sequences or cfg.n_sequences, cfg.n_sequences)
            seqs = iter_sequences(
                model.tokens, data, cfg.seq_len, text_field=cfg.text_field, limit=limit
            )
            result = describe(
                head_patterns(model, ((q.index, q.ids) for q in seqs), args.head),
                args.head,
                rules,
                model.tokens.display,
                source=f"the run's dataset ({limit} sequences of {cfg.seq_len} tokens, re-read)",
                **n,
            )
    emit(args, result, describe_text(result))


def _decompose(args):
    from headscope.data.corpus import ensure_default_corpus
    from headscope.decompose.commands import run_command
    from headscope.precompute.sequences import iter_sequences

    ad = adapter(args)
    data = Path(args.data) if args.data else ensure_default_corpus()
    seqs = iter_sequences(
        ad.tokens, data, args.seq_len, text_field=args.text_field, limit=args.contexts
    )
    skip = {"cmd", "decompose_cmd", "handler", "model", "data", "text_field", "contexts", "json"}
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    options["out"] = Path(args.out)
    if "variants" in options:
        options["variants"] = tuple(options["variants"])
    result, text = run_command(ad, (s.ids for s in seqs), args.decompose_cmd, **options)
    emit(args, result, text)


def _ablate(args):
    """Every head (or --heads) ablated over a run's dataset, a corpus slice, a text or the
    repeated-random-token task; --add-column writes the effect into the run's metrics."""
    import torch

    from headscope.analysis.ablate import ABLATION_METRIC_DOC, ablate_heads, format_text
    from headscope.analysis.synthetic import repeated_random_tokens
    from headscope.errors import InputError

    run = None
    seq_len, data, text_field = args.seq_len, args.data, args.text_field
    if args.run:
        from headscope.precompute.config import PrecomputeConfig
        from headscope.store import open_run

        run = open_run(args.run)
        cfg = PrecomputeConfig.from_dict(run.manifest["config"])
        args.model = args.model or cfg.model
        seq_len = seq_len or cfg.seq_len
        data = data or cfg.data
        text_field = cfg.text_field if args.data is None else text_field
    elif args.add_column:
        raise InputError("--add-column needs a RUN to add the column to")
    args.model = args.model or "default"
    model = adapter(args)
    positions = None
    if args.task == "repeated":
        rep = repeated_random_tokens(model, args.sequences, ((seq_len or 41) - 1) // 2)
        tokens, positions, source = rep.tokens, rep.positions, "repeated random tokens"
    else:
        from headscope.precompute.sequences import iter_sequences

        if data is None:
            from headscope.data.corpus import ensure_default_corpus

            data = ensure_default_corpus()
        seq_len = seq_len or 256
        seqs = list(
            iter_sequences(
                model.tokens, Path(data), seq_len, text_field=text_field, limit=args.sequences
            )
        )
        if not seqs:
            raise InputError(f"{data} holds no sequence of {seq_len} tokens")
        tokens, source = torch.stack([s.ids for s in seqs]), f"{data}"
    heads = None if args.heads == ["all"] else args.heads
    result = ablate_heads(
        model,
        tokens,
        heads,
        method=args.method,
        positions=positions,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    text = format_text(result, limit=args.top)
    if run is not None and args.add_column:
        from headscope.store.columns import add_head_columns

        suffix = "_repeated" if args.task == "repeated" else ""
        col = f"{result.method}_ablation_loss_delta{suffix}"
        values = {a.head: a.delta for a in result.heads if "+" not in a.head}
        size = f"{len(tokens)} x {tokens.shape[1]} tokens"
        doc = f"{ABLATION_METRIC_DOC} Measured on {size} of {source}."
        add_head_columns(
            run.path, {col: {h: v for h, v in values.items() if v is not None}}, {col: doc}
        )
        text += f"\nadded {col} to the run's metrics (the app's scatter and head pages show it)"
    emit(args, result, text)


def _decompose_pages(args):
    from headscope.decompose.pages import format_index, write_pages

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    index = write_pages(adapter(args), args.run, heads=args.heads, log=log)
    emit(args, index, format_index(index))


def _long_prefix(args):
    """The long-prefix induction test on a model; --add-column stores it with a run."""
    from headscope.analysis.long_prefix import CLASSES, format_text, long_prefix_test
    from headscope.errors import InputError

    run = None
    if args.run:
        from headscope.store import open_run

        run = open_run(args.run)
        args.model = args.model or run.manifest["config"].get("model", "default")
    elif args.add_column:
        raise InputError("--add-column needs a RUN to add the column to")
    args.model = args.model or "default"
    result = long_prefix_test(
        adapter(args),
        args.prefix_lengths,
        n_sequences=args.sequences,
        seq_len=args.seq_len,
        seed=args.seed,
        min_attention=args.min_attention,
        long_ratio=args.long_ratio,
    )
    text = format_text(result)
    if run is not None and args.add_column:
        from headscope.store.columns import add_head_columns, add_head_curves

        kind = {x.head: float(CLASSES.index(x.kind)) for x in result.heads}
        gain = {x.head: max(x.attention) - x.attention[0] for x in result.heads}
        doc = (
            f"Long-prefix induction test ({result.n_sequences} random sequences of "
            f"{result.seq_len} tokens per prefix length {result.prefix_lengths[0]}.."
            f"{result.prefix_lengths[-1]}): "
        )
        add_head_columns(
            run.path,
            {"long_prefix_kind": kind, "long_prefix_gain": gain},
            {
                "long_prefix_kind": doc + "0 not an induction head, 1 short-prefix (standard) "
                f"induction, 2 long-prefix induction (one matching token gives less than "
                f"{result.long_ratio} of the peak attention).",
                "long_prefix_gain": doc + "the peak attention to the induction target over the "
                "prefix lengths minus the attention when one token matches.",
            },
        )
        add_head_curves(
            run.path,
            {
                "long_prefix_attention": {x.head: x.attention for x in result.heads},
                "long_prefix_corrupted_attention": {
                    x.head: x.corrupted_attention for x in result.heads
                },
                "long_prefix_dla": {x.head: x.dla for x in result.heads},
            },
        )
        text += "\nadded long_prefix_kind and long_prefix_gain to the run's metrics, curves to its heads"
    emit(args, result, text)


def add_research_commands(sub) -> None:
    sp = command(
        sub,
        "train-sae",
        _train_sae,
        "train SAEs on resid, z or v activations, label features, report heads",
    )
    model_args(sp)
    data_args(sp)
    sp.add_argument(
        "--site",
        choices=["resid", "z", "v"],
        required=True,
        help="resid / z: one SAE per layer; v: one SAE over the values of one or two layers",
    )
    sp.add_argument("--layers", type=int, nargs="+", required=True, help="layers to train on")
    sp.add_argument("--out", required=True, help="output folder: one SAELens folder per SAE")
    sp.add_argument("--n-features", type=int, default=2048, help="dictionary size")
    sp.add_argument("--k", type=int, default=32, help="active features per token (TopK)")
    sp.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    sp.add_argument(
        "--label-tokens",
        type=int,
        default=100_000,
        help="tokens after the training stretch for feature cards (0: none)",
    )
    sp.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    sp.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    sp.add_argument(
        "--lr", type=float, help="Adam learning rate (default: 2e-3 * sqrt(2048 / n-features))"
    )
    sp.add_argument("--seed", type=int, default=0, help="random seed")

    sp = command(
        sub,
        "train-resid",
        _train_resid,
        "residual dictionaries for every layer from one forward pass over the data (resumable), "
        "with a per-layer quality table (explained variance, L0, dead, QK error share)",
    )
    model_args(sp)
    data_args(sp)
    sp.add_argument("--out", required=True, help="output folder: one SAELens folder per layer")
    sp.add_argument("--layers", type=int, nargs="+", help="layers to train (default: all)")
    sp.add_argument("--n-features", type=int, help="dictionary size")
    sp.add_argument("--k", type=int, help="active features per token (TopK)")
    sp.add_argument("--tokens", type=int, help="training tokens captured")
    sp.add_argument("--epochs", type=int, help="passes over the captured tokens")
    sp.add_argument("--n-eval", type=int, help="held-out tokens for the table")
    sp.add_argument("--seq-len", type=int, help="tokens per packed sequence")
    sp.add_argument("--batch-size", type=int, help="sequences per forward pass")
    sp.add_argument("--sae-batch-size", type=int, help="rows per optimiser step")
    sp.add_argument(
        "--lr", type=float, help="Adam learning rate (default: 2e-3 * sqrt(2048 / n-features))"
    )
    sp.add_argument("--label-tokens", type=int, help="training tokens for feature cards")
    sp.add_argument("--edges", type=int, help="random QK edges per layer for the error share")
    sp.add_argument("--shard-tokens", type=int, help="rows per stream file")
    sp.add_argument("--seed", type=int, help="random seed")
    sp.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
    sp.add_argument(
        "--threads", type=int, help="torch CPU threads (on a busy machine 1 is often faster)"
    )
    sp.add_argument("--keep-stream", action="store_true", help="keep the captured rows")

    sp = command(
        sub,
        "describe",
        _describe,
        "test a head's description (named rules over query/key pairs, docs/describe.md) on a "
        "run: coverage of its attention, events and top examples, and counterexamples",
    )
    sp.add_argument("run", help="run folder")
    sp.add_argument("head", help="a head such as L5H3")
    sp.add_argument("rules", help="rules file (YAML)")
    sp.add_argument(
        "--on",
        choices=["dataset", "examples", "stored"],
        default="dataset",
        help="dataset: the run's sequences re-read and run through the model up to the head's "
        "layer; examples: the head's stored example sequences, patterns recomputed; stored: "
        "the stored sparse patterns only (no model)",
    )
    sp.add_argument("--sequences", type=int, help="read at most this many (dataset)")
    sp.add_argument("--counterexamples", type=int, default=10, help="counterexamples to list")
    sp.add_argument("--model", help="the model to run; none given: the run's model")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations"
    )
    sp.add_argument("--json", action="store_true", help="print JSON")

    dec = sub.add_parser(
        "decompose", help="train decompositions of one attention layer (MTC, QK, head split)"
    ).add_subparsers(dest="decompose_cmd", required=True, metavar="COMMAND")
    for name, help_ in (
        ("mtc", "multi-token transcoders of a layer, with the single-head and SAE+MTC baselines"),
        ("qk", "QK diagonalisation of one head: sparse query/key features that form its pattern"),
        ("split", "split one head into k heads whose summed output reproduces it"),
    ):
        sp = dec.add_parser(name, help=help_, description=help_, formatter_class=Help)
        sp.set_defaults(handler=_decompose)
        model_args(sp, dtype=False)
        data_args(sp)
        sp.add_argument("--layer", type=int, required=True, help="the attention layer")
        sp.add_argument("--out", required=True, help="output folder (see docs/decompose.md)")
        sp.add_argument("--contexts", type=int, default=96, help="packed contexts to read")
        sp.add_argument("--seq-len", type=int, default=128, help="tokens per context")
        sp.add_argument("--eval", dest="n_eval", type=int, default=16, help="held-out contexts")
        sp.add_argument("--epochs", type=int, default=8, help="passes over the training contexts")
        sp.add_argument("--lr", type=float, help="Adam learning rate (default: the method's)")
        sp.add_argument("--seed", type=int, default=0, help="random seed")
        if name == "mtc":
            sp.add_argument(
                "--variants",
                nargs="+",
                choices=["mtc", "single_head", "sae_mtc"],
                default=["mtc", "single_head", "sae_mtc"],
                help="what to train: the transcoder, the one-head baseline, SAE features + MTC",
            )
            sp.add_argument(
                "--target",
                choices=["attn_out", "resid_post"],
                default="attn_out",
                help="what the transcoder reconstructs: the attention output or the residual",
            )
            sp.add_argument("--n-features", type=int, default=512, help="dictionary size")
            sp.add_argument("--k-moved", type=int, default=128, help="features moved per context")
            sp.add_argument("--l1", type=float, default=2e-3, help="sparsity penalty")
        else:
            sp.add_argument("--head", type=int, required=True, help="query head in the layer")
        if name == "qk":
            sp.add_argument("--n-features", type=int, default=64, help="query/key features")
            sp.add_argument("--rank", type=int, default=1, help="1: scalar features; r: r-dim")
            sp.add_argument(
                "--variant",
                choices=["softmax", "linear"],
                default="softmax",
                help="softmax: the features' scores form the pattern; linear: they are the pattern",
            )
            sp.add_argument("--l1", type=float, default=1e-3, help="sparsity penalty")
        if name == "split":
            sp.add_argument("--k", dest="k", type=int, default=2, help="sub-heads")
            sp.add_argument("--d-head", type=int, help="sub-head dim (default: the head's)")
    help_ = (
        "feature pages for the app: every decomposition under RUN/decompose/ shown on the run's "
        "stored example sequences (pages.json beside each, RUN/decompose/index.json)"
    )
    sp = dec.add_parser("pages", help=help_, description=help_, formatter_class=Help)
    sp.set_defaults(handler=_decompose_pages)
    sp.add_argument("run", help="run folder with a decompose/ subfolder")
    sp.add_argument(
        "--heads",
        nargs="+",
        help="show each layer on these heads' example sequences only (default: all its heads)",
    )
    model_args(sp, dtype=False)

    sp = command(
        sub,
        "ablate",
        _ablate,
        "zero-, mean- or resample-ablate every head (batched) and measure the change in "
        "next-token loss over a run's dataset, a corpus or repeated random tokens",
    )
    sp.add_argument("run", nargs="?", help="run folder: its model and dataset (optional)")
    sp.add_argument("--model", help="the model to run (default: the run's, else default)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations"
    )
    data_args(sp)
    sp.add_argument(
        "--heads",
        nargs="+",
        default=["all"],
        help="heads to ablate, each alone, or L0H0+L1H0 together; all: every head",
    )
    sp.add_argument(
        "--method",
        choices=["zero", "mean", "resample"],
        default="zero",
        help="replace the head's output by zero, its mean, or its output on another sequence",
    )
    sp.add_argument(
        "--task",
        choices=["data", "repeated"],
        default="data",
        help="data: packed sequences of the data; repeated: BOS + random tokens repeated, "
        "scored on the repeat (the induction task)",
    )
    sp.add_argument("--sequences", type=int, default=32, help="sequences to score")
    sp.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: the run's, else 256)"
    )
    sp.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    sp.add_argument("--seed", type=int, default=0, help="repeated tokens / resample order")
    sp.add_argument("--top", type=int, default=20, help="heads to list in the text output")
    sp.add_argument(
        "--add-column",
        action="store_true",
        help="write the per-head loss change into the run's metrics as "
        "<method>_ablation_loss_delta[_repeated] (the app's scatter plots it)",
    )
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = command(
        sub,
        "long-prefix",
        _long_prefix,
        "the long-prefix induction test: attention and direct logit attribution to the "
        "induction target per matched prefix length, a corrupted-prefix control, and each head "
        "classed as short- or long-prefix induction",
    )
    sp.add_argument("run", nargs="?", help="run folder: its model, and where --add-column writes")
    sp.add_argument("--model", help="the model to run (default: the run's, else default)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations"
    )
    sp.add_argument(
        "--prefix-lengths", type=int, nargs="+", default=list(range(1, 9)), help="m values"
    )
    sp.add_argument("--sequences", type=int, default=32, help="random sequences per m")
    sp.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    sp.add_argument("--seed", type=int, default=0, help="random seed")
    sp.add_argument(
        "--min-attention", type=float, default=0.3, help="induction head: peak attention"
    )
    sp.add_argument(
        "--long-ratio", type=float, default=0.5, help="long prefix: m=1 attention / peak below"
    )
    sp.add_argument(
        "--add-column",
        action="store_true",
        help="store the result with the run: long_prefix_kind / long_prefix_gain metrics and "
        "the curves on each head page",
    )
    sp.add_argument("--json", action="store_true", help="print JSON")
