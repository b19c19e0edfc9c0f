"""Subcommands that test heads causally: ablations and the long-prefix induction test."""

from __future__ import annotations

from pathlib import Path

from headscope.cli.common import adapter, command, data_args, emit


def _run_or_model(sp, run_help: str) -> None:
    """An optional run folder and the model to run (the run's unless --model says otherwise)."""
    sp.add_argument("run", nargs="?", help=run_help)
    sp.add_argument("--model", help="the model to run (default: the run's, else default)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="weights and activations; auto: bf16 where the device computes it natively",
    )


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
    ms = sorted(set(args.prefix_lengths))
    if args.add_column and ms != list(range(1, len(ms) + 1)):
        raise InputError(
            "--add-column stores curves that the head page draws against prefix lengths 1..n: "
            f"give --prefix-lengths 1 2 ... n (not {' '.join(map(str, ms))})"
        )
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


def add_experiment_commands(sub) -> None:
    sp = command(
        sub,
        "ablate",
        _ablate,
        "zero-, mean- or resample-ablate every head (batched) and measure the change in "
        "next-token loss over a run's dataset, a corpus or repeated random tokens",
    )
    _run_or_model(sp, "run folder: its model and dataset (optional)")
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
    _run_or_model(sp, "run folder: its model, and where --add-column writes")
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
