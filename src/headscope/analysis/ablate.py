"""Head ablations: replace heads' outputs and measure the change in loss and in chosen logits.

From "We Inspected Every Head in GPT-2 Small Using SAEs": zero-, mean- or resample-ablate a head
and measure the next-token loss (and the logits of chosen tokens) at chosen positions. A head is
ablated through its ``z`` (the input of ``W_O``, one ``[D]`` vector per position): its whole
contribution to the residual stream goes through ``z @ W_O[h]``, which is linear, so replacing
``z`` by its mean is replacing the head's output by its mean.

Every head of a model is one batched computation, not one forward pass per head. A clean pass
keeps the residual stream entering each layer (and the heads' ``z`` where the method needs it).
An ablation whose earliest head is in layer ``l`` leaves layers ``0..l-1`` untouched, so it
starts from the clean residual entering ``l``: the sequences are replicated along the batch, each
copy has its own heads replaced (an edit of its own rows of ``z``), and the layers below ``l``
are skipped. Rows are processed in chunks of ``batch_size`` to bound memory. A copy with nothing
replaced reproduces the clean numbers up to the float rounding of a different batch size.

The ablations work through the model's own modules (a pre-hook on each layer's output
projection, a pre-hook on the first layer run), so every architecture the adapter supports is
covered with no per-family code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from headscope.analysis.ablation_hooks import (
    _final_hidden,
    _start_at,
    _z_hook,
)
from headscope.analysis.inputs import InputError, parse_heads
from headscope.model import ModelAdapter
from headscope.model.spec import get_module, head_name

if TYPE_CHECKING:
    import pandas as pd

Method = Literal["zero", "mean", "resample"]
METHODS: tuple[str, ...] = get_args(Method)
_LOGIT_BUDGET = 1 << 26  # float32 logits materialised at once while scoring (256 MB)


class HeadAblation(BaseModel):
    """The effect of ablating one head, or one set of heads ablated together (``L0H0+L1H0``)."""

    head: str
    loss: float | None = None  # mean next-token loss with the head ablated
    delta: float | None = None  # loss - clean loss (positive: the model needs the head)
    logit_deltas: list[float] = Field(default_factory=list)  # per target: ablated - clean logit


class AblationResult(BaseModel):
    """Clean and ablated next-token loss (and target logits), per ablated head.

    Losses average the next-token cross entropy over every sequence and every scored position
    that has a next token; target logits average over every scored position. They are None
    when no scored position has a next token (only target logits were asked for)."""

    model: str
    method: Method
    n_sequences: int
    seq_len: int
    positions: list[int]  # scored logit positions; the loss at t predicts token t + 1
    n_predictions: int  # next-token predictions each loss averages over
    clean_loss: float | None
    target_tokens: list[int] = Field(default_factory=list)
    target_labels: list[str] = Field(default_factory=list)  # display strings of target_tokens
    clean_logits: list[float] = Field(default_factory=list)  # per target: mean clean logit
    mean_sequences: int | None = None  # mean ablation: sequences the mean was taken over
    resample_from: list[int] | None = None  # resample: sequence i reads sequence [i]'s z
    seed: int
    heads: list[HeadAblation]  # in the order asked for

    def ranked(self) -> list[HeadAblation]:
        """Heads by effect, largest first: the loss increase, or (no loss scored) the drop of
        the first target token's logit."""

        def effect(a: HeadAblation) -> float:
            if a.delta is not None:
                return a.delta
            return -a.logit_deltas[0] if a.logit_deltas else 0.0

        return sorted(self.heads, key=effect, reverse=True)


# ----- validation ------------------------------------------------------------------------------
def _as_tokens(adapter: ModelAdapter, tokens: Any, what: str = "tokens") -> Tensor:
    """``[B, T]`` (or ``[T]``) ids as a long tensor on the model's device, checked."""
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a [sequences, positions] array of token ids") from None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise InputError(f"{what} is empty or not a [sequences, positions] array of token ids")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"{what} must hold integer token ids")
    vocab = adapter.spec.d_vocab
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"{what} holds ids outside the vocabulary 0..{vocab - 1}")
    limit = adapter.spec.max_positions
    if limit is not None and ids.shape[1] > limit:
        raise InputError(f"{what} are {ids.shape[1]} tokens long; the model allows {limit}")
    return ids.long().to(adapter.device)


def _ablation_sets(
    adapter: ModelAdapter, heads: Sequence[str] | None
) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """Names and (layer, head) sets: ``L3H1`` alone, ``L0H0+L1H0`` together; None: every head."""
    if not heads:
        return [(head_name(lay, h), ((lay, h),)) for lay, h in parse_heads(adapter, None)]
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    for entry in heads:
        if not isinstance(entry, str) or not entry.strip():
            raise InputError(f"bad head {entry!r}; expected a name like L5H3 or L0H0+L1H0")
        pairs = tuple(sorted(set(parse_heads(adapter, entry.split("+")))))
        out["+".join(head_name(lay, h) for lay, h in pairs)] = pairs
    return list(out.items())


def _positions(n_tokens: int, positions: Sequence[int] | None) -> list[int]:
    """Sorted distinct logit positions (negative counts from the end); None: every prediction."""
    if positions is None:
        return list(range(n_tokens - 1))
    out = set()
    for p in positions:
        q = int(p) + n_tokens if int(p) < 0 else int(p)
        if not 0 <= q < n_tokens:
            raise InputError(f"position {p} is outside the sequences (0..{n_tokens - 1})")
        out.add(q)
    if not out:
        raise InputError("no position to score")
    return sorted(out)


def _permutation(n: int, seed: int) -> Tensor:
    """A fixed permutation of ``n >= 2`` sequences with no fixed point (one cycle in a random
    order): resampling never reads a sequence's own activations."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


# ----- scoring ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Scorer:
    """Per-row sums of next-token losses and target logits at the scored positions."""

    adapter: ModelAdapter
    tokens: Tensor  # [B, T]
    positions: Tensor  # [P] sorted logit positions
    n_loss: int  # positions[:n_loss] have a next token
    targets: Tensor  # [K]

    def logits(self, hidden: Tensor) -> Tensor:  # [..., d] final-normed -> [..., V] float32
        ad = self.adapter
        logits = get_module(ad.model, ad.spec.layout.unembed)(hidden)
        cap = ad.spec.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def __call__(self, hidden: Tensor, seq: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden [N, T, d]`` of rows showing sequences ``seq [N]`` -> loss sums ``[N]`` and
        target logit sums ``[N, K]``, float64."""
        h = hidden[:, self.positions]  # [N, P, d]
        N, P = h.shape[:2]
        K = len(self.targets)
        loss = torch.zeros(N, dtype=torch.float64, device=h.device)
        target = torch.zeros(N, K, dtype=torch.float64, device=h.device)
        step = max(1, _LOGIT_BUDGET // (P * self.adapter.spec.d_vocab))
        nxt = self.tokens[:, self.positions[: self.n_loss] + 1]  # [B, n_loss]
        for a in range(0, N, step):
            logits = self.logits(h[a : a + step])  # [n, P, V]
            if self.n_loss:
                lp = logits[:, : self.n_loss]
                picked = lp.gather(-1, nxt[seq[a : a + step]][..., None])[..., 0]
                loss[a : a + step] = (torch.logsumexp(lp, -1) - picked).double().sum(1)
            if K:
                target[a : a + step] = logits[..., self.targets].double().sum(1)
        return loss, target


# ----- passes ----------------------------------------------------------------------------------
def _chunks(n: int, size: int) -> Iterator[slice]:
    for a in range(0, n, size):
        yield slice(a, min(a + size, n))


def _mean_z(
    adapter: ModelAdapter, tokens: Tensor, layers: list[int], batch_size: int
) -> dict[int, Tensor]:
    """Each head's ``z`` averaged over every position of ``tokens``: ``{layer: [H, D]}``."""
    sums: dict[int, Tensor] = {}

    def add(lay: int) -> Callable[[Tensor], None]:
        def fn(z: Tensor) -> None:
            part = z.double().sum((0, 1))  # [H, D]
            sums[lay] = sums[lay] + part if lay in sums else part

        return fn

    with ExitStack() as stack:
        for lay in layers:
            stack.callback(_z_hook(adapter, lay, add(lay)).remove)
        for part in _chunks(tokens.shape[0], batch_size):
            adapter.model.base_model(input_ids=tokens[part], use_cache=False)
    return {lay: (s / tokens.numel()).to(adapter.dtype) for lay, s in sums.items()}


def _clean_pass(
    adapter: ModelAdapter,
    tokens: Tensor,
    resid_layers: list[int],
    z_layers: list[int],
    scorer: _Scorer,
    batch_size: int,
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor, Tensor]:
    """Clean residuals entering ``resid_layers`` ``{l: [B, T, d]}``, the ``z`` of ``z_layers``
    ``{l: [B, T, H, D]}``, and per-sequence loss sums ``[B]`` and target logit sums ``[B, K]``."""
    resid: dict[int, list[Tensor]] = {lay: [] for lay in resid_layers}
    zs: dict[int, list[Tensor]] = {lay: [] for lay in z_layers}

    def keep_resid(lay: int) -> Callable[..., None]:
        def pre(_mod: Any, args: tuple, kwargs: dict) -> None:
            resid[lay].append(args[0] if args else kwargs["hidden_states"])

        return pre

    def keep_z_(lay: int) -> Callable[[Tensor], None]:
        return lambda z: zs[lay].append(z)

    losses, targets = [], []
    with ExitStack() as stack:
        for lay in resid_layers:
            pre = adapter.layer(lay).register_forward_pre_hook(keep_resid(lay), with_kwargs=True)
            stack.callback(pre.remove)
        for lay in z_layers:
            stack.callback(_z_hook(adapter, lay, keep_z_(lay)).remove)
        for part in _chunks(tokens.shape[0], batch_size):
            seq = torch.arange(tokens.shape[0], device=tokens.device)[part]
            loss, target = scorer(_final_hidden(adapter, tokens[part]), seq)
            losses.append(loss)
            targets.append(target)
    return (
        {lay: torch.cat(v) for lay, v in resid.items()},
        {lay: torch.cat(v) for lay, v in zs.items()},
        torch.cat(losses),
        torch.cat(targets),
    )


@torch.no_grad()
def ablate_heads(
    adapter: ModelAdapter,
    tokens: Tensor | Sequence[Sequence[int]],
    heads: Sequence[str] | None = None,
    *,
    method: Method = "zero",
    positions: Sequence[int] | None = None,
    target_tokens: Sequence[int] | None = None,
    mean_tokens: Tensor | Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> AblationResult:
    """Ablate each of ``heads`` in turn and measure the loss at ``positions`` of ``tokens``.

    ``tokens``: ``[B, T]`` token ids (BOS included; sequences of one length, e.g. a slice of a
    dataset or prompts of equal length). ``heads``: names like ``L5H3``, each ablated on its
    own, or ``L0H0+L1H0`` for a set ablated together; None: every head of the model, one at a
    time. ``method``: replace the head's output by ``zero``; by its ``mean`` over every position
    of ``mean_tokens`` (default: ``tokens``); or ``resample`` it from another sequence of
    ``tokens`` at the same position (a fixed permutation with no fixed point, from ``seed``).
    ``positions``: logit positions to score (negative counts from the end; default every
    position that has a next token); the loss at ``t`` is the cross entropy of token ``t + 1``.
    ``target_tokens``: ids whose mean logit change at ``positions`` is also reported.
    ``batch_size``: rows (copies of a sequence) per forward pass; bounds memory.

    All ablations run as batched passes that start at each ablation's first layer from a single
    clean pass; the model must not run other forward passes meanwhile (its layers are hooked)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    ids = _as_tokens(adapter, tokens)
    B, T = ids.shape
    sets = _ablation_sets(adapter, heads)
    pos = _positions(T, positions)
    n_loss = sum(p < T - 1 for p in pos)
    targets = list(target_tokens or [])
    if any(not 0 <= int(t) < adapter.spec.d_vocab for t in targets):
        raise InputError(f"target tokens must be ids in 0..{adapter.spec.d_vocab - 1}")
    if not n_loss and not targets:
        raise InputError("no scored position has a next token: give target_tokens to score")
    if method == "resample" and B < 2:
        raise InputError("resample ablation needs at least 2 sequences to resample from")
    if mean_tokens is not None and method != "mean":
        raise InputError("mean_tokens is only used by the mean method")
    device = adapter.device
    scorer = _Scorer(
        adapter,
        ids,
        torch.tensor(pos, dtype=torch.long, device=device),
        n_loss,
        torch.tensor(targets, dtype=torch.long, device=device),
    )
    layers = sorted({lay for _, pairs in sets for lay, _ in pairs})
    starts = sorted({pairs[0][0] for _, pairs in sets})
    resid, clean_z, clean_loss, clean_target = _clean_pass(
        adapter, ids, starts, layers if method == "resample" else [], scorer, batch_size
    )
    means: dict[int, Tensor] = {}
    mean_rows = None
    if method == "mean":
        mean_ids = ids if mean_tokens is None else _as_tokens(adapter, mean_tokens, "mean_tokens")
        means = _mean_z(adapter, mean_ids, layers, batch_size)
        mean_rows = mean_ids.shape[0]
    perm = _permutation(B, seed).to(device) if method == "resample" else None

    A, K = len(sets), len(targets)
    loss_sum = torch.zeros(A, dtype=torch.float64, device=device)
    target_sum = torch.zeros(A, K, dtype=torch.float64, device=device)
    for start in starts:
        members = [i for i, (_, pairs) in enumerate(sets) if pairs[0][0] == start]
        # Rows are (ablation, sequence) pairs, ablation-major.
        abl = torch.tensor(members, dtype=torch.long, device=device).repeat_interleave(B)
        seq = torch.arange(B, device=device).repeat(len(members))
        for part in _chunks(len(abl), batch_size):
            a_idx, s_idx = abl[part], seq[part]
            edits = _row_edits(sets, a_idx.tolist(), s_idx, method, means, clean_z, perm)
            with ExitStack() as stack:
                stack.enter_context(_start_at(adapter, start, resid[start][s_idx]))
                for lay, fn in edits.items():
                    stack.callback(_z_hook(adapter, lay, fn).remove)
                hidden = _final_hidden(adapter, ids[s_idx])
            loss, target = scorer(hidden, s_idx)
            loss_sum.index_add_(0, a_idx, loss)
            target_sum.index_add_(0, a_idx, target)

    n_pred = B * n_loss
    clean = float(clean_loss.sum()) / n_pred if n_loss else None
    clean_logits = (clean_target.sum(0) / (B * len(pos))).tolist()
    results = []
    for i, (name, _) in enumerate(sets):
        loss_i = float(loss_sum[i]) / n_pred if n_loss else None
        logits_i = (target_sum[i] / (B * len(pos))).tolist()
        results.append(
            HeadAblation(
                head=name,
                loss=loss_i,
                delta=None if loss_i is None or clean is None else loss_i - clean,
                logit_deltas=[a - c for a, c in zip(logits_i, clean_logits, strict=True)],
            )
        )
    return AblationResult(
        model=adapter.name,
        method=method,
        n_sequences=B,
        seq_len=T,
        positions=pos,
        n_predictions=n_pred,
        clean_loss=clean,
        target_tokens=[int(t) for t in targets],
        target_labels=[adapter.tokens.display(int(t)) for t in targets],
        clean_logits=clean_logits,
        mean_sequences=mean_rows,
        resample_from=None if perm is None else perm.tolist(),
        seed=seed,
        heads=results,
    )


def _row_edits(
    sets: list[tuple[str, tuple[tuple[int, int], ...]]],
    rows: list[int],  # ablation index of each row of the chunk
    seq: Tensor,  # [N] sequence of each row
    method: str,
    means: dict[int, Tensor],  # {layer: [H, D]}
    clean_z: dict[int, Tensor],  # {layer: [B, T, H, D]}
    perm: Tensor | None,  # [B] resample source of each sequence
) -> dict[int, Callable[[Tensor], Tensor]]:
    """The z edit of each layer for one chunk: rows ``r`` get head ``h`` replaced, for every
    (r, h) of that layer among the rows' ablations, in one indexed assignment per layer."""
    pairs: dict[int, tuple[list[int], list[int]]] = {}
    for r, a in enumerate(rows):
        for lay, h in sets[a][1]:
            rs, hs = pairs.setdefault(lay, ([], []))
            rs.append(r)
            hs.append(h)
    device = seq.device

    def edit(lay: int, r_idx: Tensor, h_idx: Tensor) -> Callable[[Tensor], Tensor]:
        if method == "zero":
            value: Tensor | float = 0.0
        elif method == "mean":
            value = means[lay][h_idx][:, None]  # [K, 1, D]
        else:
            assert perm is not None
            value = clean_z[lay][perm[seq[r_idx]], :, h_idx]  # [K, T, D]

        def fn(z: Tensor) -> Tensor:  # [N, T, H, D]
            z = z.clone()
            z[r_idx, :, h_idx] = value
            return z

        return fn

    return {
        lay: edit(
            lay,
            torch.tensor(rs, dtype=torch.long, device=device),
            torch.tensor(hs, dtype=torch.long, device=device),
        )
        for lay, (rs, hs) in pairs.items()
    }


# ----- presentation ----------------------------------------------------------------------------
ABLATION_METRIC_DOC = (
    "How much the next-token loss rises when this head's output is removed (zero-, mean- or "
    "resample-ablated, see the column name), averaged over the scored tokens."
)


def metric_column(result: AblationResult) -> pd.DataFrame:
    """The single-head effects as a metrics-table column: ``layer, head, name,
    {method}_ablation_loss_delta``, ready to merge into ``Run.metrics`` on ``name``."""
    import pandas as pd

    from headscope.model.spec import parse_head

    rows = [
        (*parse_head(a.head), a.head, a.delta)
        for a in result.heads
        if "+" not in a.head and a.delta is not None
    ]
    return pd.DataFrame(
        rows, columns=["layer", "head", "name", f"{result.method}_ablation_loss_delta"]
    )


def format_text(result: AblationResult, limit: int | None = None) -> str:
    """A table of the ablations, largest effect first (at most ``limit`` rows)."""
    r = result
    lines = [
        f"{r.method} ablation of {len(r.heads)} head(s) in {r.model}: {r.n_sequences} "
        f"sequence(s) x {r.seq_len} tokens, {len(r.positions)} position(s) scored"
    ]
    if r.clean_loss is not None:
        lines.append(f"clean loss {r.clean_loss:.4f} over {r.n_predictions} predictions")
    for label, value in zip(r.target_labels, r.clean_logits, strict=True):
        lines.append(f"clean logit of {label!r}: {value:.4f}")
    ranked = r.ranked()[:limit] if limit is not None else r.ranked()
    width = max([4, *(len(a.head) for a in ranked)])
    header = f"{'head':<{width}}"
    if r.clean_loss is not None:
        header += f"  {'loss':>9}  {'Δloss':>9}"
    titles = [f"Δlogit {label!r}" for label in r.target_labels]
    header += "".join(f"  {t:>{max(10, len(t))}}" for t in titles)
    lines.append(header)
    for a in ranked:
        row = f"{a.head:<{width}}"
        if a.loss is not None and a.delta is not None:
            row += f"  {a.loss:>9.4f}  {a.delta:>+9.4f}"
        row += "".join(
            f"  {d:>+{max(10, len(t))}.4f}" for d, t in zip(a.logit_deltas, titles, strict=True)
        )
        lines.append(row)
    if limit is not None and len(r.heads) > limit:
        lines.append(f"... {len(r.heads) - limit} more")
    return "\n".join(lines)
