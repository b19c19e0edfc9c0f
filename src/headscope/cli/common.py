"""What every subcommand shares: output, model loading, common flags, subcommand groups."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

MAX_TOKENS_HELP = (
    "longest text a live request takes, BOS included, up to the model's context (default "
    "model: 8192); a cached text costs ~400 kB per token there (3.2 GB at 8192)"
)
MODEL_HELP = "default (SmolLM2-135M-Instruct) | gemma-3-270m | a HF model folder | a .gguf file"


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default unless it has none (None, False) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_:
            return help_
        return super()._get_help_string(action)


def emit(args: argparse.Namespace, payload: Any, text: str | None = None) -> None:
    """``payload`` as JSON with ``--json`` (or when there is no text form), else ``text``."""
    if getattr(args, "json", False) or text is None:
        if isinstance(payload, BaseModel):
            payload = payload.model_dump(mode="json")
        json.dump(payload, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(text)


def adapter(args: argparse.Namespace):
    import torch

    from headscope.model import ModelAdapter

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name(args)]
    return ModelAdapter.load(args.model, device=getattr(args, "device", "cpu"), dtype=dtype)


def dtype_name(args: argparse.Namespace) -> str:
    """``--dtype`` with ``auto`` resolved: bf16 where the device computes it natively, else fp32."""
    name = getattr(args, "dtype", "fp32")
    if name == "auto":
        from headscope.model.loading import fast_dtype

        return fast_dtype(getattr(args, "device", "cpu"))
    return name


def model_args(sp: argparse.ArgumentParser, dtype: bool = True) -> None:
    sp.add_argument("--model", default="default", help=MODEL_HELP)
    sp.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:1, ...; auto or auto:0=70GiB,1=70GiB,cpu=200GiB: sharded over "
        "the GPUs with CPU and disk offload (docs/scale.md)",
    )
    if dtype:
        sp.add_argument(
            "--dtype",
            choices=["fp32", "bf16", "auto"],
            default="fp32",
            help="weights and activations; auto: bf16 where the device computes it natively "
            "(GPUs, CPUs with AVX512-BF16/AMX), else fp32",
        )
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")


GROUPS: dict[str, Any] = {}


def groups(sub, word: str):
    """The sub-subcommand group ``word`` (``attribute``, ``export``, ...), created once."""
    key = f"{id(sub)}:{word}"
    if key not in GROUPS:
        help_ = {
            "attribute": "exact QK / OV attributions of one edge",
            "export": "export a run",
            "import": "import a run",
            "corpus": "the default corpus",
            "motifs": "heads of several runs (models) in one pattern-motif space",
        }[word]
        GROUPS[key] = sub.add_parser(word, help=help_).add_subparsers(
            dest=f"{word}_cmd", required=True, metavar="COMMAND"
        )
    return GROUPS[key]


def command(sub, name: str, handler: Callable, help_: str) -> argparse.ArgumentParser:
    words = name.split()
    parent = groups(sub, words[0]) if len(words) == 2 else sub
    sp = parent.add_parser(words[-1], help=help_, description=help_, formatter_class=Help)
    sp.set_defaults(handler=handler)
    return sp


def data_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--data", help="text file/folder, JSONL, Parquet or HF dataset folder (default: corpus)"
    )
    sp.add_argument("--text-field", default="text", help="the text field of JSONL / Parquet rows")
