"""Controlled sweeps: one slot in a template, many values, chosen heads' attention on a pair.

The HeadVis paper's year sweep ("the head attends strongly only for 1000-1986") is
``headscope sweep --template "... {} ..." --range 1000:2000 --head L?H? --query slot:-1 --key slot:0``.
"""

from __future__ import annotations

import re

import torch

from headscope.analysis.batching import run_grouped
from headscope.analysis.inputs import parse_heads
from headscope.analysis.results import SweepResult
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.limits import MAX_SWEEP_VALUES
from headscope.model.spec import head_name

_SLOT = re.compile(r"slot:(-?\d+)")


def resolve_position(spec: str | int, n_tokens: int, slot: list[int]) -> int:
    """A position spec: an int (negative counts from the end), ``last``, or ``slot:i`` (the
    i-th token of the slot's value; negative counts from the value's last token)."""
    if isinstance(spec, int) or (isinstance(spec, str) and re.fullmatch(r"-?[0-9]+", spec)):
        pos = int(spec)
        pos = pos + n_tokens if pos < 0 else pos
    elif spec == "last":
        pos = n_tokens - 1
    else:
        m = _SLOT.fullmatch(str(spec))
        if not m:
            raise InputError(f"position {spec!r} must be an integer, 'last' or 'slot:i'")
        i = int(m.group(1))
        if not -len(slot) <= i < len(slot):
            raise InputError(f"{spec!r}: the slot value has only {len(slot)} tokens")
        pos = slot[i]
    if not 0 <= pos < n_tokens:
        raise InputError(f"position {spec!r} is outside the text ({n_tokens} tokens)")
    return pos


def sweep(
    session: Session,
    template: str,
    values: list[str],
    heads: list[str],
    query: str | int = "slot:-1",
    key: str | int = "slot:0",
) -> SweepResult:
    """Attention of ``heads`` on (query, key) for each value substituted into ``template``'s
    single ``{}`` slot. Positions may refer to the slot (``slot:0``, ``slot:-1``)."""
    if template.count("{}") != 1:
        raise InputError("the template must contain exactly one {} slot")
    if not values:
        raise InputError("no values to sweep")
    if len(values) > MAX_SWEEP_VALUES:
        raise InputError(f"{len(values)} values; the limit is {MAX_SWEEP_VALUES}")
    pairs = parse_heads(session.adapter, heads)
    if not heads:
        raise InputError("name at least one head")
    prefix, suffix = template.split("{}")
    seqs, qk_pos, detail = [], [], []
    for value in values:
        text = prefix + value + suffix
        ids, slot = session.adapter.tokens.span_positions(
            text, len(prefix), len(prefix) + len(value)
        )
        if len(ids) > session.max_tokens:
            raise InputError(
                f"value {value!r} makes the text longer than {session.max_tokens} tokens"
            )
        q = resolve_position(query, len(ids), slot)
        k = resolve_position(key, len(ids), slot)
        if k > q:
            raise InputError(f"for value {value!r} the key ({k}) is after the query ({q})")
        seqs.append(ids)
        qk_pos.append((q, k))
        toks = session.adapter.tokens
        detail.append(
            {
                "value": value,
                "query": q,
                "key": k,
                "query_token": toks.display(ids[q]),
                "key_token": toks.display(ids[k]),
            }
        )
    attention = {head_name(layer, h): [0.0] * len(values) for layer, h in pairs}
    layers = sorted({layer for layer, _ in pairs})

    def handle(idx, cap):
        rows = torch.arange(len(idx))
        qs = torch.tensor([qk_pos[i][0] for i in idx])
        ks = torch.tensor([qk_pos[i][1] for i in idx])
        for layer in layers:
            edge = cap.layers[layer].pattern[rows, :, qs, ks]  # [B, H]: each row's (q, k) entry
            for layer_, h in pairs:
                if layer_ == layer:
                    col = attention[head_name(layer, h)]
                    for j, value in zip(idx, edge[:, h].tolist(), strict=True):
                        col[j] = value

    run_grouped(session.adapter, seqs, handle, layers=layers, patterns=True)
    return SweepResult.model_validate(
        {"template": template, "values": list(values), "positions": detail, "attention": attention}
    )
