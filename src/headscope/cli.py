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
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"headscope {key}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
