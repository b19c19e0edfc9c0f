"""The live operations' subcommands, generated from the operation table: flags from each
request model's fields, text from each operation's formatter."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from headscope.cli.common import MAX_TOKENS_HELP, Help, adapter, emit, groups, model_args
from headscope.errors import InputError
from headscope.limits import MAX_TOKENS
from headscope.operations import Context, Operation


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


# operations without a basis field that read the residual dictionaries
READ_DICTIONARIES = ("virtual-weights", "head-loadings", "edge-graph", "feature")
# operations that stream text (a served run's data, else the default text)
READ_TEXT = ("feature",)


def live_parser(sub, op: Operation) -> None:
    words = op.name.split()
    parent = sub
    for word in words[:-1]:
        parent = groups(sub, word)
    sp = parent.add_parser(words[-1], help=op.help, description=op.help, formatter_class=Help)
    model_args(sp, dtype=False)
    sp.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=MAX_TOKENS_HELP)
    fields = op.request.model_fields
    if "basis" in fields or op.name in READ_DICTIONARIES:
        sp.add_argument(
            "--dictionaries", metavar="DIR", help="residual SAEs (train-sae output or SAELens)"
        )
    if op.name in READ_TEXT:
        sp.add_argument(
            "--run",
            metavar="RUN",
            help="read the top contexts from this precompute run's data (default: the default "
            "text after the dictionary's training sequences)",
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

    text = None
    if getattr(args, "run", None):
        from headscope.dictionaries.feature_page import TextSource

        if not Path(args.run).is_dir():
            raise InputError(f"no run folder {args.run}")
        text = TextSource.of_run(args.run)
        if text is None:
            raise InputError(f"{args.run} has no precompute manifest naming its data")
    ctx = Context(
        lambda: Session(adapter(args), max_tokens=args.max_tokens),
        dictionaries if getattr(args, "dictionaries", None) else None,
        text,
    )
    result = op.run(ctx, req)
    emit(args, result, op.text(result, req))
