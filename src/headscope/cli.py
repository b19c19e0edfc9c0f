"""The ``headscope`` command line. Thin: each subcommand parses arguments and calls one library
function (the same one the tests, the server and notebooks call)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def _emit(args: argparse.Namespace, payload: Any, text: str | None = None) -> None:
    if getattr(args, "json", False) or text is None:
        json.dump(payload, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(text)


def _adapter(args: argparse.Namespace):
    import torch

    from headscope.model import ModelAdapter

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[getattr(args, "dtype", "fp32")]
    return ModelAdapter.load(args.model, device=getattr(args, "device", "cpu"), dtype=dtype)


# ----- foundation ---------------------------------------------------------------------------------
@command("info")
def _info(args):
    info = _adapter(args).info()
    lines = [f"{k:>18}: {v}" for k, v in info.items()]
    _emit(args, info, "\n".join(lines))


@command("attend")
def _attend(args):
    from headscope.analysis.attend import attend

    result = attend(_adapter(args), args.text, args.head or None)
    if args.json:
        _emit(args, result.to_dict())
        return
    print(" ".join(f"[{i}]{t!r}" for i, t in enumerate(result.tokens)))
    for name, rows in result.patterns.items():
        last = rows[-1]
        top = sorted(range(len(last)), key=lambda k: -last[k])[:5]
        tops = ", ".join(f"{result.tokens[k]!r}@{k}: {last[k]:.3f}" for k in top)
        print(f"{name}: last token attends to {tops}")


def _session(args):
    from headscope.analysis.session import Session

    return Session(_adapter(args))


def _basis(args):
    """``--basis components`` (default) or ``--basis sae:DIR`` (residual dictionaries)."""
    spec = getattr(args, "basis", "components") or "components"
    if spec == "components":
        return None
    if not spec.startswith("sae:"):
        raise ValueError("--basis must be 'components' or 'sae:DIR'")
    from headscope.dictionaries.basis import DictionarySet

    return DictionarySet(spec[4:])


# ----- live analysis ------------------------------------------------------------------------------
@command("rank-heads")
def _rank_heads(args):
    from headscope.analysis.attribution import rank_heads

    out = rank_heads(_session(args), args.text, args.query, args.key)
    rows = [
        f"{r['head']:>8}  attention {r['attention']:.4f}  score {r['score']:+.3f}"
        for r in out["heads"][: args.top]
    ]
    head = f"query {out['query']} {out['tokens'][out['query']]!r} -> key {out['key']} {out['tokens'][out['key']]!r}"
    _emit(args, out["heads"], "\n".join([head, *rows]))


@command("attribute qk")
def _attribute_qk(args):
    from headscope.analysis.attribution import qk_attribution

    out = qk_attribution(
        _session(args), args.text, args.head, args.query, args.key, top=args.top, basis=_basis(args)
    )
    lines = [
        f"{out['head']} query {out['query']} {out['tokens'][out['query']]!r} -> key {out['key']} {out['tokens'][out['key']]!r}",
        f"score (model) {out['score']:+.5f}   total of {out['n_terms']} terms {out['total']:+.5f}   attention {out['attention']:.4f}",
    ]
    if out["capped_score"] is not None:
        lines.append(f"softcapped score {out['capped_score']:+.5f}")
    lines += [f"{t['value']:+9.4f}  {t['query']:>10} x {t['key']}" for t in out["terms"][:20]]
    _emit(args, out, "\n".join(lines))


@command("attribute ov")
def _attribute_ov(args):
    from headscope.analysis.attribution import ov_attribution

    out = ov_attribution(
        _session(args), args.text, args.head, args.query, args.key, top=args.top, basis=_basis(args)
    )
    lines = [
        f"{out['head']} moves |o| = {out['total_norm']:.4f} (model {out['model_norm']:.4f}) from key {out['key']} to query {out['query']}",
        "promotes: " + ", ".join(repr(t["token"]) for t in out["promoted"]),
        "suppresses: " + ", ".join(repr(t["token"]) for t in out["suppressed"]),
    ]
    lines += [
        f"{t['value']:+9.4f}  {t['component']:>10}  -> {t['logit_top']}" for t in out["terms"][:20]
    ]
    _emit(args, out, "\n".join(lines))


@command("virtual-weights")
def _virtual_weights(args):
    from headscope.dictionaries.basis import DictionarySet
    from headscope.dictionaries.circuits import virtual_weights

    out = virtual_weights(
        _adapter(args),
        DictionarySet(args.dictionaries),
        args.head,
        args.feature,
        args.side,
        top=args.top,
    )
    lines = [f"{out['feature']} through {out['head']}'s {args.side} side"]
    for title, key in (("same side", "same_side"), ("other side", "other_side")):
        lines.append(f"{title}:")
        lines += [f"  {r['cosine']:+.3f}  {r['feature']}" for r in out[key][:10]]
    _emit(args, out, "\n".join(lines))


@command("head-loadings")
def _head_loadings(args):
    from headscope.dictionaries.basis import DictionarySet
    from headscope.dictionaries.circuits import head_loadings

    out = head_loadings(
        _session(args),
        args.text,
        DictionarySet(args.dictionaries),
        args.layer,
        args.source_feature,
        args.source_pos,
        args.target_feature,
        args.target_pos,
    )
    lines = [
        f"{out['source']['feature']}@{out['source']['position']} -> {out['target']['feature']}@{out['target']['position']}"
    ]
    lines += [
        f"  {h['head']:>7} share {h['share']:.3f} loading {h['loading']:+.4g}" for h in out["heads"]
    ]
    _emit(args, out, "\n".join(lines))


@command("composition")
def _composition(args):
    from headscope.analysis.attribution import composition

    out = composition(_session(args), args.text, args.head, args.query, args.key)
    lines = []
    for side in ("k_composition", "q_composition"):
        lines.append(side.replace("_", "-") + ":")
        lines += [
            f"  {c['value']:+8.4f} {c['head']:>8} (attends to {c['attends_to']} {c['attends_to_token']!r}, {c['weight']:.2f})"
            for c in out[side]
        ]
    _emit(args, out, "\n".join(lines))


@command("sweep")
def _sweep(args):
    from headscope.analysis.sweep import expand_range, sweep

    values = expand_range(args.range) if args.range else list(args.values or [])
    out = sweep(_session(args), args.template, values, args.head, args.query, args.key)
    heads = list(out["attention"])
    lines = ["value".ljust(12) + "".join(h.rjust(10) for h in heads)]
    for i, v in enumerate(out["values"]):
        lines.append(v.ljust(12) + "".join(f"{out['attention'][h][i]:10.4f}" for h in heads))
    p0 = out["positions"][0]
    lines.append(f"(query {p0['query_token']!r} -> key {p0['key_token']!r} for the first value)")
    _emit(args, out, "\n".join(lines))


@command("geometry")
def _geometry(args):
    from headscope.analysis.geometry import qk_geometry

    def read(path):
        return [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]

    out = qk_geometry(_session(args), read(args.queries), read(args.keys), args.head)
    lines = [
        f"{h}: mean diagonal {v.get('diag_mean', float('nan')):+.3f}, off-diagonal {v.get('offdiag_mean', float('nan')):+.3f}"
        for h, v in out["heads"].items()
    ]
    r = out["residual"]
    lines.append(
        f"residual (layer {r['layer']}): mean diagonal {r.get('diag_mean', float('nan')):+.3f}, off-diagonal {r.get('offdiag_mean', float('nan')):+.3f}"
    )
    _emit(args, out, "\n".join(lines))


@command("intervene")
def _intervene(args):
    from headscope.analysis.intervene import intervene

    out = intervene(
        _session(args),
        args.text,
        args.head,
        args.component,
        args.side,
        args.scale,
        args.query,
        args.key,
        args.freeze_patterns,
    )
    lines = [
        f"{h['head']}: attention {h['attention_before']} -> {h['attention_after']}"
        for h in out["heads"]
    ]
    lines.append(
        "next token before: "
        + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in out["next_token_before"][:5])
    )
    lines.append(
        "next token after:  "
        + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in out["next_token_after"][:5])
    )
    lines.append(f"KL(before || after) = {out['kl_divergence']:.5f}")
    _emit(args, out, "\n".join(lines))


# ----- precompute ---------------------------------------------------------------------------------
@command("precompute")
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
        f"run: {out}  ({len(m)} heads, {run.manifest['tokens']['tokens']} tokens, {run.manifest['timings']['total_s']:.0f} s)"
    ]
    for col in m.columns[3:]:
        top = m.nlargest(3, col)
        lines.append(
            f"{col:>24}: "
            + ", ".join(f"{n} {v:.3f}" for n, v in zip(top["name"], top[col], strict=True))
        )
    _emit(args, run.manifest, "\n".join(lines))


# ----- serving, export, demo ---------------------------------------------------------------------
@command("serve")
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


@command("demo")
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


@command("export static")
def _export_static(args):
    from headscope.store.static import export_static

    out = export_static(args.run, args.out)
    _emit(
        args,
        {"out": str(out)},
        f"static site written to {out} (serve it with any static web server)",
    )


@command("export headvis")
def _export_headvis(args):
    from headscope.store.headvis import export_headvis

    out = export_headvis(Path(args.run), Path(args.out))
    _emit(args, {"out": str(out)}, f"HeadVis tree written to {out}")


@command("import headvis")
def _import_headvis(args):
    from headscope.store.headvis import import_headvis

    out = import_headvis(Path(args.tree), Path(args.run))
    _emit(args, {"run": str(out)}, f"imported {args.tree} as run {out}")


# ----- dictionaries -------------------------------------------------------------------------------
@command("train-sae")
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


@command("corpus build")
def _corpus_build(args):
    from headscope.data.corpus import build_corpus, default_corpus_path, format_stats

    stats = build_corpus(Path(args.out) if args.out else default_corpus_path())
    _emit(
        args, stats.to_dict() if hasattr(stats, "to_dict") else stats.__dict__, format_stats(stats)
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headscope", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, dtype=True):
        sp.add_argument(
            "--model",
            default="default",
            help="default | gemma-3-270m | a HF directory | a .gguf file",
        )
        sp.add_argument("--device", default="cpu", help="cpu or cuda")
        if dtype:
            sp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
        sp.add_argument("--json", action="store_true", help="print JSON")

    sp = sub.add_parser("info", help="architecture summary of a model")
    model_args(sp)

    sp = sub.add_parser("attend", help="tokens and attention patterns of heads on a text")
    model_args(sp)
    sp.add_argument("--text", required=True)
    sp.add_argument(
        "--head", action="append", help="a head such as L3H1 (repeatable; default: all)"
    )

    def pair_args(sp, head=True):
        model_args(sp, dtype=False)
        sp.add_argument("--text", required=True)
        if head:
            sp.add_argument("--head", required=True, help="e.g. L5H3")
        sp.add_argument(
            "--query", type=int, required=True, help="query position (negative: from the end)"
        )
        sp.add_argument("--key", type=int, required=True, help="key position (<= query)")

    sp = sub.add_parser("rank-heads", help="every head's attention on one (query, key) pair")
    pair_args(sp, head=False)
    sp.add_argument("--top", type=int, default=20, help="rows to print (JSON has all)")

    attribute = sub.add_parser("attribute", help="exact QK / OV attributions").add_subparsers(
        dest="attribute_cmd", required=True
    )
    for kind in ("qk", "ov"):
        sp = attribute.add_parser(kind, help=f"{kind.upper()} attribution of one edge")
        pair_args(sp)
        sp.add_argument("--top", type=int, default=200 if kind == "qk" else 30)
        sp.add_argument(
            "--basis", default="components", help="components, or sae:DIR (residual dictionaries)"
        )

    sp = sub.add_parser(
        "virtual-weights", help="features nearest to a feature through a head's W_K/W_Q"
    )
    model_args(sp, dtype=False)
    sp.add_argument(
        "--dictionaries",
        required=True,
        help="folder of residual SAEs (train-sae output or SAELens)",
    )
    sp.add_argument("--head", required=True)
    sp.add_argument("--feature", type=int, required=True)
    sp.add_argument("--side", choices=["key", "query"], default="key")
    sp.add_argument("--top", type=int, default=20)

    sp = sub.add_parser(
        "head-loadings", help="each head's share of a feature-to-feature edge (adjacent layers)"
    )
    model_args(sp, dtype=False)
    sp.add_argument("--dictionaries", required=True)
    sp.add_argument("--text", required=True)
    sp.add_argument("--layer", type=int, required=True, help="source layer L (target: L+1)")
    sp.add_argument("--source-feature", type=int, required=True)
    sp.add_argument("--source-pos", type=int, required=True)
    sp.add_argument("--target-feature", type=int, required=True)
    sp.add_argument("--target-pos", type=int, required=True)

    sp = sub.add_parser("composition", help="earlier heads driving an edge (K- and Q-composition)")
    pair_args(sp)

    sp = sub.add_parser("sweep", help="attention on a pair while one template slot varies")
    model_args(sp, dtype=False)
    sp.add_argument("--template", required=True, help="text with one {} slot")
    sp.add_argument("--range", help="numeric values START:STOP[:STEP], e.g. 1000:2000")
    sp.add_argument("--values", nargs="*", help="explicit values")
    sp.add_argument("--head", action="append", required=True)
    sp.add_argument("--query", default="slot:-1", help="int, 'last' or slot:i (default slot:-1)")
    sp.add_argument("--key", default="slot:0", help="int, 'last' or slot:i (default slot:0)")

    sp = sub.add_parser("geometry", help="QK geometry: cosine of mean-subtracted queries vs keys")
    model_args(sp, dtype=False)
    sp.add_argument(
        "--queries", required=True, help="file: one prompt per line, token marked [[x]]"
    )
    sp.add_argument("--keys", required=True, help="file: one prompt per line, token marked [[x]]")
    sp.add_argument("--head", action="append")

    sp = sub.add_parser("intervene", help="scale a component inside chosen heads' QK circuit")
    model_args(sp, dtype=False)
    sp.add_argument("--text", required=True)
    sp.add_argument("--head", action="append", required=True)
    sp.add_argument("--component", required=True, help="embed, pos_embed, bias, L3H1 or L3.mlp")
    sp.add_argument("--side", choices=["query", "key"], required=True)
    sp.add_argument("--scale", type=float, default=0.0)
    sp.add_argument("--query", type=int, default=-1)
    sp.add_argument("--key", type=int)
    sp.add_argument(
        "--freeze-patterns", action="store_true", help="freeze every other head's pattern"
    )

    sp = sub.add_parser(
        "precompute", help="stream a dataset through the model and record every head"
    )
    model_args(sp)
    sp.add_argument(
        "--data",
        help="text file/folder, JSONL, Parquet or HF dataset dir (default: the default corpus)",
    )
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--sequences", type=int, default=256)
    sp.add_argument("--tokens", type=int, help="instead of --sequences: this many tokens")
    sp.add_argument("--seq-len", type=int, default=512)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--layers", type=int, nargs="*")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--checkpoint-every", type=int, default=8, help="batches between checkpoints")

    sp = sub.add_parser("serve", help="serve the browser app, a run and the live API")
    sp.add_argument("run", nargs="?", help="run directory (optional)")
    sp.add_argument("--model", help="model for live analysis (default: none, static only)")
    sp.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)"
    )
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--token", help="access token (generated when --host is not local)")
    sp.add_argument(
        "--dictionaries",
        help="residual SAEs for feature-basis attributions (default: RUN/dictionaries)",
    )

    sp = sub.add_parser(
        "demo", help="corpus + precompute + attributions on the default model, then serve"
    )
    sp.add_argument("--out", help="run directory (default: the user cache)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--sequences", type=int, default=64)
    sp.add_argument("--seq-len", type=int, default=256)
    sp.add_argument("--no-serve", action="store_true", help="build the demo run and exit")

    export = sub.add_parser("export", help="export a run").add_subparsers(
        dest="export_cmd", required=True
    )
    sp = export.add_parser("static", help="the app + run as a static site")
    sp.add_argument("run")
    sp.add_argument("out")
    sp.add_argument("--json", action="store_true")
    sp = export.add_parser(
        "headvis", help="the HeadVis data tree (config.json, scatter_data.json, heads/)"
    )
    sp.add_argument("run")
    sp.add_argument("out")
    sp.add_argument("--json", action="store_true")
    imp = sub.add_parser("import", help="import a run").add_subparsers(
        dest="import_cmd", required=True
    )
    sp = imp.add_parser("headvis", help="a HeadVis data tree (e.g. a Neuronpedia export) as a run")
    sp.add_argument("tree")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser(
        "train-sae", help="train SAEs on resid, z or v activations, label features, report heads"
    )
    model_args(sp)
    sp.add_argument(
        "--site",
        choices=["resid", "z", "v"],
        required=True,
        help="resid / z: one SAE per layer; v: one SAE on the values of one or two layers",
    )
    sp.add_argument("--layers", type=int, nargs="+", required=True)
    sp.add_argument("--out", required=True, help="output folder: one SAELens folder per SAE")
    sp.add_argument(
        "--data",
        help="text file/folder, JSONL, Parquet or HF dataset dir (default: the default corpus)",
    )
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--n-features", type=int, default=2048)
    sp.add_argument("--k", type=int, default=32, help="active features per token (TopK)")
    sp.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    sp.add_argument(
        "--label-tokens",
        type=int,
        default=100_000,
        help="tokens after the training stretch for feature cards (0: none)",
    )
    sp.add_argument("--seq-len", type=int, default=256)
    sp.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    sp.add_argument("--lr", type=float, help="Adam learning rate (default 2e-3*sqrt(2048/n))")
    sp.add_argument("--seed", type=int, default=0)

    corpus = sub.add_parser("corpus", help="the default corpus").add_subparsers(
        dest="corpus_cmd", required=True
    )
    sp = corpus.add_parser(
        "build", help="assemble the default multi-domain corpus from installed packages"
    )
    sp.add_argument("--out", help="output folder (default: the user cache, see docs/corpus.md)")
    sp.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    key = args.cmd
    sub = getattr(args, f"{args.cmd}_cmd", None)
    if sub:
        key = f"{args.cmd} {sub}"
    from headscope.analysis.inputs import InputError

    try:
        COMMANDS[key](args)
    except (InputError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"headscope {key}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
