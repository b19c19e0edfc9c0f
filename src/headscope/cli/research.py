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


def _z_heads(args):
    """Per head of the z dictionaries' layers: its top 10 features by decoder-norm share, its
    class and how much of its output they explain; --add-column writes them into RUN."""
    from headscope.dictionaries.z_heads import (
        add_to_run,
        format_text,
        measure_settings,
        z_folders,
        z_heads,
    )
    from headscope.errors import InputError

    folders = z_folders(args.saes)
    n_tokens = args.tokens
    if args.run:
        if args.data:
            raise InputError("--data: a RUN is measured on its own data; give one or the other")
        settings = measure_settings(args.run)
        args.model = args.model or settings["model"]
        n_tokens = min(n_tokens, settings["max_tokens"])
        kw = {k: settings[k] for k in ("data", "seq_len", "text_field", "skip_sequences")}
    elif args.add_column:
        raise InputError("--add-column needs a RUN to add the columns to")
    else:
        kw = {"data": args.data, "seq_len": args.seq_len, "text_field": args.text_field}
    args.model = args.model or "default"
    result = z_heads(folders, adapter(args) if n_tokens > 0 else None, n_tokens=n_tokens, **kw)
    text = format_text(result)
    if args.run and args.add_column:
        cols = add_to_run(args.run, result)
        text += (
            f"\nadded {', '.join(cols)} to the run's metrics and a z-dictionary panel to its "
            "head pages"
        )
    emit(args, result, text)


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
    for name in ("variants", "l1s", "ks"):
        if name in options:
            options[name] = tuple(options[name])
    if "mtc" in options:
        options["mtc"] = Path(options["mtc"])
    result, text = run_command(ad, (s.ids for s in seqs), args.decompose_cmd, **options)
    emit(args, result, text)


def _decompose_pages(args):
    from headscope.decompose.pages import format_index, write_pages

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    index = write_pages(adapter(args), args.run, heads=args.heads, log=log)
    emit(args, index, format_index(index))


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
        "z-heads",
        _z_heads,
        "heads through z dictionaries: each head's top 10 features by decoder-norm share, its "
        "class (mono-, mostly mono-, bi-, polysemantic) and the fraction of its output they "
        "explain; --add-column stores them with a run",
    )
    sp.add_argument("saes", help="a train-sae output folder (its z_L* folders) or one z_L folder")
    sp.add_argument("run", nargs="?", help="a run: measure on its data (and its model)")
    model_args(sp)
    sp.set_defaults(model=None)
    data_args(sp)
    sp.add_argument(
        "--tokens",
        type=int,
        default=16_384,
        help="tokens to measure the explained fractions on (0: do not load the model); with a "
        "RUN at most its tokens",
    )
    sp.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    sp.add_argument(
        "--add-column",
        action="store_true",
        help="write zsae_class, zsae_top_feature_share, zsae_explained and zsae_top10_explained "
        "into RUN's metrics and a z-dictionary panel into its head pages",
    )

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
        (
            "sweep",
            "(L0, FVE) curves: the MTC, the single-head MTC and SAE + MTC at each L1 on the "
            "same layer, contexts and width",
        ),
        (
            "value-clusters",
            "k-means cluster sizes of value-SAE head loadings (one layer and two) beside an MTC's",
        ),
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
        if name in ("mtc", "sweep"):
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
        if name == "mtc":
            sp.add_argument("--l1", type=float, default=2e-3, help="sparsity penalty")
        if name == "sweep":
            sp.add_argument(
                "--l1s",
                type=float,
                nargs="+",
                default=[3e-4, 1e-3, 3e-3, 1e-2],
                help="sparsity penalties, one point per variant each (larger: smaller L0)",
            )
        if name == "value-clusters":
            sp.set_defaults(epochs=20)
            sp.add_argument("--n-features", type=int, default=512, help="value-SAE width")
            sp.add_argument("--k", type=int, default=16, help="active features per token (TopK)")
            sp.add_argument(
                "--ks", type=int, nargs="+", default=[2, 8, 32, 128], help="k-means cluster counts"
            )
            sp.add_argument("--mtc", help="an MTC folder (decompose mtc OUT/mtc) to set beside")
            sp.add_argument(
                "--one-layer",
                dest="two_layer",
                action="store_false",
                help="only the layer's own value SAE (default: also layers L-1 and L together)",
            )
            sp.add_argument("--batch-size", type=int, default=512, help="rows per SAE step")
        if name in ("qk", "split"):
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
