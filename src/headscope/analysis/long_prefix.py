"""The long-prefix induction test of "We Inspected Every Head in GPT-2 Small Using SAEs", in full.

Synthetic sequences of random tokens ``BOS ... X s_1..s_m t ... Y s_1..s_m`` with ``X != Y``: at
the second ``s_m`` (the query) exactly ``m`` tokens match an earlier stretch, and induction
predicts ``t`` (the key: the token after the first ``s_m``). For each prefix length ``m`` and
each head: the mean attention from the query to ``t``, and the head's direct logit attribution
(DLA) to ``t`` at the query (its output ``z_h W_O[h]`` through the final norm, scale frozen at
its actual value, and the unembedding). The corrupted-prefix control replaces the second
``s_1..s_{m-1}`` by fresh random tokens, so only the query token matches whatever ``m`` is: a
head whose attention rises with ``m`` only through the prefix falls back to its ``m = 1`` level.

A head is an induction head when its attention to ``t`` reaches ``min_attention`` at some ``m``;
it is a *long-prefix* head when a one-token match gives less than ``long_ratio`` of its peak
attention, else a *short-prefix* (standard) head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from headscope.analysis.inputs import parse_heads
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.model.spec import head_name, norm_factor

CLASSES = ("none", "short", "long")


class PrefixHead(BaseModel):
    head: str
    attention: list[float] = Field(description="mean attention to the induction key, per m")
    dla: list[float] = Field(description="mean direct logit attribution to the next token")
    corrupted_attention: list[float] = Field(description="the same with the prefix corrupted")
    kind: str = Field(description="none | short | long")


class LongPrefixResult(BaseModel):
    """Per head, curves over the prefix lengths and a short/long-prefix classification."""

    model: str
    prefix_lengths: list[int]
    n_sequences: int
    seq_len: int
    min_attention: float
    long_ratio: float
    heads: list[PrefixHead]


def _random(adapter: ModelAdapter, shape: tuple[int, int], g: torch.Generator) -> Tensor:
    vocab = min(adapter.tokens.vocab_size, adapter.spec.d_vocab)
    excluded = set(adapter.tokens.special_ids) | {adapter.tokens.bos_id}
    allowed = torch.tensor([i for i in range(vocab) if i not in excluded], dtype=torch.long)
    return allowed[torch.randint(len(allowed), shape, generator=g)]


def prefix_sequences(
    adapter: ModelAdapter, m: int, n: int, length: int, seed: int, corrupt: bool = False
) -> tuple[Tensor, int, int]:
    """``[n, length]`` sequences with an ``m``-token match ending at the query; returns the
    tokens, the query position and the key position (the induction target)."""
    g = torch.Generator().manual_seed(seed * 1000 + m)
    ids = _random(adapter, (n, length), g)
    ids[:, 0] = adapter.tokens.bos_id
    a = 2  # the first stretch s_1..s_m starts here, after BOS and X
    b = length - m  # the second stretch ends at the last position (the query)
    if b <= a + m + 1:
        raise InputError(f"sequences of {length} tokens are too short for a prefix of {m}")
    ids[:, b : b + m] = ids[:, a : a + m]
    # X != Y, and the prefix tokens are distinct from anything that would lengthen the match
    clash = ids[:, b - 1] == ids[:, a - 1]
    fresh = _random(adapter, (n, 1), g)[:, 0]
    ids[:, b - 1] = torch.where(clash & (fresh != ids[:, a - 1]), fresh, ids[:, b - 1])
    ids[:, b - 1] = torch.where(ids[:, b - 1] == ids[:, a - 1], ids[:, b - 2], ids[:, b - 1])
    if corrupt and m > 1:
        ids[:, b : b + m - 1] = _random(adapter, (n, m - 1), g)
    return ids, length - 1, a + m


@torch.no_grad()
def _measure(
    adapter: ModelAdapter, ids: Tensor, q: int, k: int, layers: list[int], batch_size: int
) -> tuple[Tensor, Tensor]:
    """Mean attention ``[L, H]`` from ``q`` to ``k`` and mean DLA ``[L, H]`` to ``ids[:, k]``."""
    s = adapter.spec
    att = torch.zeros(s.n_layers, s.n_heads, dtype=torch.float64)
    dla = torch.zeros(s.n_layers, s.n_heads, dtype=torch.float64)
    W_U = adapter.unembed()[0]  # [d, V]
    ln = adapter.ln_final()
    for a in range(0, ids.shape[0], batch_size):
        chunk = ids[a : a + batch_size].to(adapter.device)
        cap = adapter.run(chunk, layers=layers, patterns=True, residuals=True, logits=False)
        x = cap.get("resid_final")[:, q]  # [B, d]
        factor = norm_factor(x, s.norm)  # [B, 1]
        direction = W_U[:, chunk[:, k]].T.float()  # [B, d] unembedding of the target
        for layer in layers:
            t = cap.layers[layer]
            att[layer] += t.weights()[:, :, q, k].double().sum(0)
            out = adapter.head_outputs(t.z[:, q], layer).float()  # [B, H, d]
            if adapter.post_norm(layer, "attn") is not None:  # Gemma: the post-attention norm
                post = adapter.post_attn_factor(cap.attn_out[layer][:, q], layer)
                assert post is not None
                out = out * post[:, None].float()
            normed = adapter.apply_norm_frozen(out, factor[:, None].float(), ln)
            dla[layer] += (normed * direction[:, None]).sum(-1).double().sum(0)
    return att / ids.shape[0], dla / ids.shape[0]


def long_prefix_test(
    adapter: ModelAdapter,
    prefix_lengths: Sequence[int] = tuple(range(1, 9)),
    *,
    n_sequences: int = 32,
    seq_len: int = 64,
    seed: int = 0,
    min_attention: float = 0.3,
    long_ratio: float = 0.5,
    batch_size: int = 32,
    heads: Sequence[str] | None = None,
    max_tokens: int | None = None,
) -> LongPrefixResult:
    """Attention and DLA curves over ``prefix_lengths`` for every head (or ``heads``: only their
    layers are captured), the corrupted-prefix control, and each head's class (``none``,
    ``short``, ``long``; see the module docstring). ``max_tokens`` bounds the tokens run
    (prefix lengths x 2 x ``n_sequences`` x ``seq_len``): a live request over it is refused."""
    ms = sorted({int(m) for m in prefix_lengths})
    if not ms or ms[0] < 1:
        raise InputError("prefix lengths must be positive integers")
    if n_sequences < 1:
        raise InputError("need at least one sequence")
    limit = adapter.spec.max_positions
    if limit is not None and seq_len > limit:
        raise InputError(f"seq_len {seq_len} exceeds the model's {limit} positions")
    total = len(ms) * 2 * n_sequences * seq_len
    if max_tokens is not None and total > max_tokens:
        raise InputError(
            f"{len(ms)} prefix lengths x 2 (clean and corrupted) x {n_sequences} sequences x "
            f"{seq_len} tokens = {total} tokens; the limit is {max_tokens}: use fewer prefix "
            "lengths, sequences or tokens (or the CLI's long-prefix command, which has no limit)"
        )
    if seq_len <= 2 * ms[-1] + 3:
        raise InputError(f"sequences of {seq_len} tokens are too short for a prefix of {ms[-1]}")
    pairs = parse_heads(adapter, list(heads)) if heads else None
    layers = sorted({lay for lay, _ in pairs}) if pairs else list(range(adapter.spec.n_layers))
    curves, dlas, controls = [], [], []
    for m in ms:
        ids, q, k = prefix_sequences(adapter, m, n_sequences, seq_len, seed)
        att, dla = _measure(adapter, ids, q, k, layers, batch_size)
        bad, qc, kc = prefix_sequences(adapter, m, n_sequences, seq_len, seed, corrupt=True)
        ctrl, _ = _measure(adapter, bad, qc, kc, layers, batch_size)
        curves.append(att)
        dlas.append(dla)
        controls.append(ctrl)
    A, D, C = torch.stack(curves, -1), torch.stack(dlas, -1), torch.stack(controls, -1)
    out = []
    for layer, h in pairs or [(lay, h) for lay in layers for h in range(adapter.spec.n_heads)]:
        a = A[layer, h]
        peak = float(a.max())
        if peak < min_attention:
            kind = "none"
        else:
            kind = "long" if float(a[0]) < long_ratio * peak else "short"
        out.append(
            PrefixHead(
                head=head_name(layer, h),
                attention=a.tolist(),
                dla=D[layer, h].tolist(),
                corrupted_attention=C[layer, h].tolist(),
                kind=kind,
            )
        )
    return LongPrefixResult(
        model=adapter.name,
        prefix_lengths=ms,
        n_sequences=n_sequences,
        seq_len=seq_len,
        min_attention=min_attention,
        long_ratio=long_ratio,
        heads=out,
    )


def format_text(r: LongPrefixResult, _req: object = None) -> str:
    """The induction heads (short and long prefix) with their curves."""
    ms = " ".join(f"{m:>6}" for m in r.prefix_lengths)
    lines = [
        f"long-prefix induction test of {r.model}: {r.n_sequences} sequences x {r.seq_len} "
        f"tokens per prefix length; induction head: attention >= {r.min_attention} at some m; "
        f"long prefix: attention at m=1 < {r.long_ratio} x its peak",
        f"{'head':<8} {'kind':<6} {'':<10} {ms}",
    ]
    found = [x for x in r.heads if x.kind != "none"]
    found.sort(key=lambda x: (x.kind != "long", -max(x.attention)))
    for x in found:
        for name, ys in (("attention", x.attention), ("corrupted", x.corrupted_attention)):
            lines.append(
                f"{x.head if name == 'attention' else '':<8} "
                f"{x.kind if name == 'attention' else '':<6} {name:<10} "
                + " ".join(f"{y:>6.3f}" for y in ys)
            )
        lines.append(f"{'':<8} {'':<6} {'DLA':<10} " + " ".join(f"{y:>+6.2f}" for y in x.dla))
    if not found:
        lines.append("no head reaches the attention threshold at any prefix length")
    counts = {k: sum(x.kind == k for x in r.heads) for k in CLASSES}
    lines.append(f"{counts['long']} long-prefix, {counts['short']} short-prefix induction heads")
    return "\n".join(lines)
