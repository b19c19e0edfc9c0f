"""The ``headscope`` command line.

Thin: every live operation's subcommand is generated from the operation table
(:mod:`headscope.operations`) — its flags from the request model's fields, its text from the
operation's formatter — and each other subcommand parses its flags and calls one library
function. Every expected failure is a :class:`~headscope.errors.HeadscopeError` and ends as one
line on stderr with the error's exit code; so do Ctrl-C (exit 130) and a closed pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from headscope.errors import HeadscopeError, InputError
from headscope.operations import OPERATIONS, Context, Operation

MODEL_HELP = "default (SmolLM2-135M-Instruct) | gemma-3-270m | a HF model folder | a .gguf file"
# what a Ctrl-C loses, per command that writes something resumable
INTERRUPTED = {
    "precompute": "the run resumes from its last checkpoint when you run the same command again",
    "demo": "run it again to resume",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ----- output -------------------------------------------------------------------------------------
def _emit(args: argparse.Namespace, payload: Any, text: str | None = None) -> None:
    """``payload`` as JSON with ``--json`` (or when there is no text form), else ``text``."""
    if getattr(args, "json", False) or text is None:
        if isinstance(payload, BaseModel):
            payload = payload.model_dump(mode="json")
        json.dump(payload, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(text)


def _adapter(args: argparse.Namespace):
    import torch

    from headscope.model import ModelAdapter

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[getattr(args, "dtype", "fp32")]
    return ModelAdapter.load(args.model, device=getattr(args, "device", "cpu"), dtype=dtype)


def _model_args(sp: argparse.ArgumentParser, dtype: bool = True) -> None:
    sp.add_argument("--model", default="default", help=MODEL_HELP)
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    if dtype:
        sp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")


# ----- live operations from the table -------------------------------------------------------------
def _cli_type(ann: Any) -> Any:
    """The shape a field takes on the command line: a list, a Literal, bool, int, float or str
    (Optional and Annotated unwrapped; a union with a list is a list, other unions are str)."""
    if typing.get_origin(ann) is typing.Annotated:
        return _cli_type(typing.get_args(ann)[0])
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [_cli_type(a) for a in typing.get_args(ann) if a is not type(None)]
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists:
            return lists[0]
        return args[0] if len(args) == 1 else str
    return ann


def _add_field(sp: argparse.ArgumentParser, op: Operation, name: str, f: FieldInfo) -> None:
    flag = op.flags.get(name, "--" + name.replace("_", "-"))
    ann = _cli_type(f.annotation)
    aliased = any(field == name for field, _ in op.aliases.values())
    kw: dict[str, Any] = {
        "dest": name,
        "help": f.description or "",
        "required": f.is_required() and not aliased,
    }
    if not f.is_required() and f.default is not None and not callable(f.default):
        kw["help"] += f" (default: {f.default})"
    kw["default"] = argparse.SUPPRESS
    if name in op.files:
        kw.update(metavar="FILE", help=(kw["help"] + "; a file with one per line").lstrip("; "))
    elif typing.get_origin(ann) is list:
        kw.update(action="extend", nargs="+")
        kw["help"] += " (one or more; the flag may repeat)"
    elif typing.get_origin(ann) is typing.Literal:
        kw["choices"] = list(typing.get_args(ann))
    elif ann is bool:
        kw["action"] = "store_true"
        kw.pop("required")
    elif ann in (int, float):
        kw["type"] = ann
    sp.add_argument(flag, **kw)


def _live_parser(sub, op: Operation) -> None:
    words = op.name.split()
    parent = sub
    for word in words[:-1]:
        parent = _groups(sub, word)
    sp = parent.add_parser(words[-1], help=op.help, description=op.help, formatter_class=_Help)
    _model_args(sp, dtype=False)
    fields = op.request.model_fields
    if "basis" in fields or op.name in ("virtual-weights", "head-loadings"):
        sp.add_argument(
            "--dictionaries", metavar="DIR", help="residual SAEs (train-sae output or SAELens)"
        )
    for name, f in fields.items():
        _add_field(sp, op, name, f)
    for flag, (name, text) in op.aliases.items():
        sp.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=text)
    sp.set_defaults(handler=lambda args: _run_live(op, args))


def _read_lines(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    return [line for line in text.splitlines() if line.strip()]


def _run_live(op: Operation, args: argparse.Namespace) -> None:
    from headscope.analysis.session import Session

    values = {n: getattr(args, n) for n in op.request.model_fields if hasattr(args, n)}
    for name in op.files:
        if name in values:
            values[name] = _read_lines(values[name])
    try:
        req = op.request.model_validate(values)
    except ValidationError as err:
        from headscope.server.responses import readable_errors

        raise InputError(readable_errors(err.errors())) from None

    def dictionaries():
        from headscope.dictionaries.basis import DictionarySet

        return DictionarySet(args.dictionaries)

    ctx = Context(
        lambda: Session(_adapter(args)),
        dictionaries if getattr(args, "dictionaries", None) else None,
    )
    result = op.run(ctx, req)
    _emit(args, result, op.text(result, req))


# ----- other commands -----------------------------------------------------------------------------
def _info(args):
    info = _adapter(args).info()
    _emit(args, info, "\n".join(f"{k:>18}: {v}" for k, v in info.items()))


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
        dtype=args.dtype,
        device=args.device,
        layers=tuple(args.layers) if args.layers else None,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
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
    _emit(args, run.manifest, "\n".join(lines))


def _serve(args):
    from headscope.server.serve import serve

    serve(
        args.run,
        args.model,
        host=args.host,
        port=args.port,
        token=args.token,
        dictionaries=args.dictionaries,
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
    _emit(args, {"out": str(out)}, f"static site written to {out} (serve it with any web server)")


def _export_headvis(args):
    from headscope.store.headvis import export_headvis

    out = export_headvis(Path(args.run), Path(args.out))
    _emit(args, {"out": str(out)}, f"HeadVis tree written to {out}")


def _import_headvis(args):
    from headscope.store.headvis import import_headvis

    out = import_headvis(Path(args.tree), Path(args.run))
    _emit(args, {"run": str(out)}, f"imported {args.tree} as run {out}")


def _train_sae(args):
    from headscope.dictionaries.pipeline import format_stats, train_dictionaries
    from headscope.dictionaries.train import TrainStats

    out = train_dictionaries(
        _adapter(args),
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
    _emit(args, out, "\n".join(lines))


def _compare(args):
    from headscope.store.compare import compare_run, format_text

    result = compare_run(args.run, args.summary, top=args.top)
    text = format_text(result)
    if args.add_columns:
        from headscope.store.compare import add_reference_columns

        cols = add_reference_columns(args.run, args.summary)
        text += f"\nadded {', '.join(cols)} to the run's metrics (the app's scatter can plot them)"
    _emit(args, result, text)


def _motifs_fit(args):
    from headscope.precompute.motif_space import fit_space

    out = fit_space(args.runs, args.out)
    _emit(args, {"space": str(out)}, f"motif space fitted on {len(args.runs)} runs: {out}")


def _motifs_map(args):
    from headscope.files import write_json
    from headscope.precompute.motif_space import map_across

    m = map_across(args.runs, space=args.space, method=args.method, n_neighbors=args.neighbors)
    if args.out:
        write_json(args.out, m.model_dump())
    text = "\n".join(
        f"{x:+8.3f} {y:+8.3f}  {h}" for h, (x, y) in zip(m.heads, m.coords, strict=True)
    )
    _emit(args, m, text + (f"\nwritten to {args.out}" if args.out else ""))


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
    _emit(args, r, "\n".join(lines))


def _corpus_build(args):
    from headscope.data.corpus import build_corpus, default_corpus_path, format_stats

    stats = build_corpus(Path(args.out) if args.out else default_corpus_path())
    _emit(args, stats.to_dict(), format_stats(stats))


def _describe(args):
    from headscope.analysis.describe import describe, describe_examples, head_patterns
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
        adapter = _adapter(args)
        if args.on == "examples":
            result = describe_examples(
                run.head(args.head), rules, adapter.tokens.display, adapter=adapter, **n
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
                adapter.tokens, data, cfg.seq_len, text_field=cfg.text_field, limit=limit
            )
            result = describe(
                head_patterns(adapter, ((q.index, q.ids) for q in seqs), args.head),
                args.head,
                rules,
                adapter.tokens.display,
                source=f"the run's dataset ({limit} sequences of {cfg.seq_len} tokens, re-read)",
                **n,
            )
    _emit(args, result, describe_text(result))


def _decompose(args):
    from headscope.data.corpus import ensure_default_corpus
    from headscope.decompose.commands import run_command
    from headscope.precompute.sequences import iter_sequences

    ad = _adapter(args)
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
    _emit(args, result, text)


# ----- the parser ---------------------------------------------------------------------------------
_GROUPS: dict[str, Any] = {}


def _groups(sub, word: str):
    """The sub-subcommand group ``word`` (``attribute``, ``export``, ...), created once."""
    key = f"{id(sub)}:{word}"
    if key not in _GROUPS:
        help_ = {
            "attribute": "exact QK / OV attributions of one edge",
            "export": "export a run",
            "import": "import a run",
            "corpus": "the default corpus",
            "motifs": "heads of several runs (models) in one pattern-motif space",
        }[word]
        _GROUPS[key] = sub.add_parser(word, help=help_).add_subparsers(
            dest=f"{word}_cmd", required=True, metavar="COMMAND"
        )
    return _GROUPS[key]


def _command(sub, name: str, handler: Callable, help_: str) -> argparse.ArgumentParser:
    words = name.split()
    parent = _groups(sub, words[0]) if len(words) == 2 else sub
    sp = parent.add_parser(words[-1], help=help_, description=help_, formatter_class=_Help)
    sp.set_defaults(handler=handler)
    return sp


def _data_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--data", help="text file/folder, JSONL, Parquet or HF dataset folder (default: corpus)"
    )
    sp.add_argument("--text-field", default="text", help="the text field of JSONL / Parquet rows")


def build_parser() -> argparse.ArgumentParser:
    _GROUPS.clear()
    p = argparse.ArgumentParser(
        prog="headscope",
        description="See what every attention head of a transformer language model does, "
        "across a whole dataset, and why.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sp = _command(sub, "info", _info, "architecture summary of a model")
    _model_args(sp)
    for op in OPERATIONS:
        _live_parser(sub, op)

    sp = _command(
        sub, "precompute", _precompute, "stream a dataset through the model, record every head"
    )
    _model_args(sp)
    _data_args(sp)
    sp.add_argument("--out", required=True, help="run folder (an interrupted run resumes)")
    sp.add_argument("--sequences", type=int, default=256, help="packed sequences to read")
    sp.add_argument("--tokens", type=int, help="instead of --sequences: this many tokens")
    sp.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence")
    sp.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    sp.add_argument("--layers", type=int, nargs="*", help="layers to record (default: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the example reservoirs")
    sp.add_argument("--checkpoint-every", type=int, default=8, help="batches between checkpoints")

    sp = _command(sub, "serve", _serve, "serve the browser app, a run and the live API")
    sp.add_argument("run", nargs="?", help="run folder (optional)")
    sp.add_argument(
        "--model", help="model for live analysis (default: none, precomputed views only)"
    )
    sp.add_argument(
        "--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)"
    )
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--token", help="access token (generated when --host is not local)")
    sp.add_argument(
        "--dictionaries", help="residual SAEs for the feature basis (default: RUN/dictionaries)"
    )

    sp = _command(
        sub, "demo", _demo, "corpus + precompute + attributions on the default model, then serve"
    )
    sp.add_argument("--out", help="run folder (default: in $HEADSCOPE_CACHE)")
    sp.add_argument("--host", default="127.0.0.1", help="bind address")
    sp.add_argument("--port", type=int, default=8765)
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
        sp = _command(sub, name, handler, help_)
        sp.add_argument(first)
        sp.add_argument(second)
        sp.add_argument("--json", action="store_true", help="print JSON")

    sp = _command(
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

    sp = _command(sub, "motifs fit", _motifs_fit, "fit one motif space on the patterns of runs")
    sp.add_argument("runs", nargs="+", help="run folders (any models)")
    sp.add_argument("--out", required=True, help="the space's file (.safetensors)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = _command(sub, "motifs map", _motifs_map, "every head of several runs on one 2-D map")
    sp.add_argument("runs", nargs="+", help="run folders (any models)")
    sp.add_argument("--space", help="a fitted motif space (default: fitted on these runs)")
    sp.add_argument("--method", choices=["isomap", "tsne", "umap"], default="isomap")
    sp.add_argument("--neighbors", type=int, default=16, help="neighbourhood size / perplexity")
    sp.add_argument("--out", help="write the map as JSON here")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = _command(sub, "similar", _similar, "the heads of one run nearest to a head of another")
    sp.add_argument("head", metavar="RUN_A:HEAD", help="e.g. runs/smollm2:L18H6")
    sp.add_argument("run_b", metavar="RUN_B", help="the run (model) to search")
    sp.add_argument("--space", help="a fitted motif space (default: fitted on the two runs)")
    sp.add_argument("--top", type=int, default=10, help="heads to list")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = _command(
        sub,
        "train-sae",
        _train_sae,
        "train SAEs on resid, z or v activations, label features, report heads",
    )
    _model_args(sp)
    _data_args(sp)
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
    sp.add_argument("--seed", type=int, default=0)

    sp = _command(
        sub,
        "corpus build",
        _corpus_build,
        "assemble the default multi-domain corpus from installed packages",
    )
    sp.add_argument(
        "--out", help="output folder (default: in $HEADSCOPE_CACHE, see docs/corpus.md)"
    )
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = _command(
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
    sp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    sp.add_argument("--json", action="store_true", help="print JSON")

    dec = sub.add_parser(
        "decompose", help="train decompositions of one attention layer (MTC, QK, head split)"
    ).add_subparsers(dest="decompose_cmd", required=True, metavar="COMMAND")
    for name, help_ in (
        ("mtc", "multi-token transcoders of a layer, with the single-head and SAE+MTC baselines"),
        ("qk", "QK diagonalisation of one head: sparse query/key features that form its pattern"),
        ("split", "split one head into k heads whose summed output reproduces it"),
    ):
        sp = dec.add_parser(name, help=help_, description=help_, formatter_class=_Help)
        sp.set_defaults(handler=_decompose)
        _model_args(sp, dtype=False)
        _data_args(sp)
        sp.add_argument("--layer", type=int, required=True)
        sp.add_argument("--out", required=True, help="output folder (see docs/decompose.md)")
        sp.add_argument("--contexts", type=int, default=96, help="packed contexts to read")
        sp.add_argument("--seq-len", type=int, default=128, help="tokens per context")
        sp.add_argument("--eval", dest="n_eval", type=int, default=16, help="held-out contexts")
        sp.add_argument("--epochs", type=int, default=8, help="passes over the training contexts")
        sp.add_argument("--lr", type=float, help="Adam learning rate (default: the method's)")
        sp.add_argument("--seed", type=int, default=0)
        if name == "mtc":
            sp.add_argument(
                "--variants",
                nargs="+",
                choices=["mtc", "single_head", "sae_mtc"],
                default=["mtc", "single_head", "sae_mtc"],
            )
            sp.add_argument("--target", choices=["attn_out", "resid_post"], default="attn_out")
            sp.add_argument("--n-features", type=int, default=512)
            sp.add_argument("--k-moved", type=int, default=128, help="features moved per context")
            sp.add_argument("--l1", type=float, default=2e-3)
        else:
            sp.add_argument("--head", type=int, required=True, help="query head in the layer")
        if name == "qk":
            sp.add_argument("--n-features", type=int, default=64)
            sp.add_argument("--rank", type=int, default=1, help="1: scalar features; r: r-dim")
            sp.add_argument("--variant", choices=["softmax", "linear"], default="softmax")
            sp.add_argument("--l1", type=float, default=1e-3)
        if name == "split":
            sp.add_argument("--k", dest="k", type=int, default=2, help="sub-heads")
            sp.add_argument("--d-head", type=int, help="sub-head dim (default: the head's)")
    return p


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.cmd}_cmd", None)
    return f"{args.cmd} {sub}" if sub else args.cmd


def _quiet_stdout() -> None:
    """After a closed pipe (``headscope ... | head``): send the rest to /dev/null, no traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = _command_name(args)
    try:
        args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except HeadscopeError as err:
        print(f"headscope {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except (OSError, ValueError) as err:  # a path or value the library refused
        print(f"headscope {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = INTERRUPTED.get(name)
        print(f"\nheadscope {name}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
