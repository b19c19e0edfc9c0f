"""Per-head scores that need the model rather than the dataset: synthetic probes on repeated
random tokens, and a weight-based copying score.

They are metrics of the registry (``kind="probe"`` or ``"weights"``), so their docstrings reach
the UI like every other metric, and they share one signature: ``fn(probe: Probe) -> [L, H]``.
The precompute calls every one of them (:func:`run_probes`); heads of layers that were not
probed are 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from headscope.metrics.registry import METRICS, model_metric_names, register_metric
from headscope.model import ModelAdapter
from headscope.model.capture import LayerTensors

PREFIX_LENGTHS = (1, 2, 3, 4)


@dataclass(frozen=True, eq=False)
class Probe:
    """What a probe or weight metric reads: the model, the layers to probe and the probe sizes.

    Intermediates that several metrics (or the run writer) share are computed once with
    :meth:`memo`, as on :class:`~headscope.metrics.registry.LayerBatch`.
    """

    adapter: ModelAdapter
    layers: list[int]
    n: int  # synthetic sequences per probe
    length: int  # random tokens per sequence (the long-prefix probe uses twice as many)
    seed: int
    _memo: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def memo(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once under ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def run_probes(probe: Probe) -> dict[str, Tensor]:
    """Every registered probe and weight metric -> ``[L, H]`` float32, in registration order."""
    return {name: METRICS[name].fn(probe).float() for name in model_metric_names()}


def _random_tokens(adapter: ModelAdapter, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Random ordinary tokens: ids from the lower half of the vocabulary, specials excluded."""
    high = max(16, adapter.spec.d_vocab // 2)
    ids = torch.randint(1, high, shape, generator=gen)
    specials = torch.tensor(sorted(adapter.tokens.special_ids | {adapter.tokens.bos_id}))
    bad = torch.isin(ids, specials)
    return torch.where(bad, ids + 7, ids)


def _edge_attention(
    adapter: ModelAdapter, ids: Tensor, q: Tensor, k: Tensor, layers: list[int], groups: int = 0
) -> Tensor:
    """Mean attention of every head on the (q[b, j], k[b, j]) pairs of each sequence -> [L, H];
    with ``groups``: [L, H, groups], the mean over each of ``groups`` equal consecutive parts
    of the batch (several probes in one forward pass).

    Each layer's pairs are read as the layer runs; no pattern outlives its layer."""
    rows = torch.arange(ids.shape[0])[:, None].expand_as(q)
    L, H = adapter.spec.n_layers, adapter.spec.n_heads
    out = torch.zeros(L, H, groups) if groups else torch.zeros(L, H)

    def on_layer(t: LayerTensors) -> None:
        pairs = t.weights()[rows, :, q, k]  # pat[b, :, q, k] -> [B, J, H]
        if groups:
            out[t.layer] = pairs.unflatten(0, (groups, -1)).mean(dim=(1, 2)).T
        else:
            out[t.layer] = pairs.mean(dim=(0, 1))

    adapter.run(
        ids,
        layers=layers,
        patterns=True,
        logits=False,
        store=False,
        on_layer=on_layer,
        stop_after=max(layers, default=None),
    )
    return out


@register_metric("prefix_matching_score", kind="probe")
def prefix_matching_score(probe: Probe) -> Tensor:
    """Mean attention from a repeated random token to the token after its first occurrence.

    Probe on ``n`` synthetic sequences ``BOS + R + R`` of ``length`` random ordinary tokens ``R``
    (the classic induction-head test, prefix matching; independent of the dataset): mean of
    ``A[q, k]`` over the ``n * (length - 1)`` pairs ``q = 1 + length + j`` (the second copy of
    ``R[j]``), ``k = 2 + j`` (``R[j + 1]`` in the first copy), ``j = 0 .. length - 2``: one pair
    per query, every pair counts once. Chance repeats inside ``R`` add no pairs. One document
    per sequence, no padding."""
    adapter, n, length = probe.adapter, probe.n, probe.length
    gen = torch.Generator().manual_seed(probe.seed)
    r = _random_tokens(adapter, (n, length), gen)
    ids = torch.cat([torch.full((n, 1), adapter.tokens.bos_id), r, r], 1)  # [n, 2L+1]
    j = torch.arange(length - 1)
    q = (1 + length + j)[None].expand(n, -1)  # second occurrence of R[j]
    k = (2 + j)[None].expand(n, -1)  # the token after R[j]'s first occurrence
    return _edge_attention(adapter, ids, q, k, probe.layers)


def long_prefix_curve(probe: Probe) -> Tensor:
    """Induction attention as a function of matched prefix length m = 1..4 -> [L, H, 4].

    The long-prefix test of "We Inspected Every Head in GPT-2 Small Using SAEs": ``probe.n``
    sequences of ``2 * probe.length`` random tokens (BOS first) ``... X s_1..s_m t ... Y
    s_1..s_m`` with ``X != Y``, so the match is exactly ``m`` tokens long.
    ``curve[..., m - 1]`` is the mean over the sequences of the attention from the second
    ``s_m`` to ``t`` (one pair per sequence). Computed once per probe.

    Attention is causal, so the tokens after the last query change nothing: the sequences are
    cut there (54 of 96 tokens at the default length) and the four prefix lengths share one
    forward pass."""
    return probe.memo("long_prefix_curve", lambda: _long_prefix_curve(probe))


def _long_prefix_curve(probe: Probe) -> Tensor:
    adapter, n, length = probe.adapter, probe.n, 2 * probe.length
    gen = torch.Generator().manual_seed(probe.seed + 1)
    a, b = 3, length // 2 + 2  # first segment at a, second at b
    end = b + max(PREFIX_LENGTHS)  # one past the last query
    batches, qs, ks = [], [], []
    for m in PREFIX_LENGTHS:
        ids = _random_tokens(adapter, (n, length), gen)
        ids[:, 0] = adapter.tokens.bos_id
        ids[:, b : b + m] = ids[:, a : a + m]
        same = ids[:, b - 1] == ids[:, a - 1]
        ids[:, b - 1] = torch.where(same, ids[:, b - 1] + 1, ids[:, b - 1])
        batches.append(ids[:, :end])
        qs.append(torch.full((n, 1), b + m - 1))
        ks.append(torch.full((n, 1), a + m))
    return _edge_attention(
        adapter,
        torch.cat(batches),
        torch.cat(qs),
        torch.cat(ks),
        probe.layers,
        groups=len(PREFIX_LENGTHS),
    )


@register_metric("long_prefix_score", kind="probe")
def long_prefix_score(probe: Probe) -> Tensor:
    """How much more the head does induction when 2-4 tokens of prefix match than when one does.

    ``mean(curve[m = 2, 3, 4]) - curve[m = 1]`` of :func:`long_prefix_curve` (synthetic random
    sequences, one document each, no padding): high for "long prefix" induction heads, near 0
    for standard induction heads."""
    curve = long_prefix_curve(probe)  # [L, H, 4]
    return curve[..., 1:].mean(-1) - curve[..., 0]


@register_metric("copying_score", kind="weights")
def copying_score(probe: Probe) -> Tensor:
    """How much the head's OV circuit raises the logit of the token it attends to.

    Weight-based, no data: ``sum(eigenvalues) / sum(|eigenvalues|)`` of the full OV circuit
    ``W_E diag(w_attn) W_V W_O diag(w_final) W_U`` (the pre-attention and final norms' weights
    included, their normalisation not), computed on the small ``D x D`` matrix
    ``W_O diag(w_final) W_U W_E diag(w_attn) W_V`` that has the same nonzero eigenvalues. 1 for
    a pure copier, -1 for a pure anti-copier."""
    adapter = probe.adapter
    s = adapter.spec
    W_E = adapter.embed_matrix().float()  # [V, d]
    W_U = adapter.unembed()[0].float()  # [d, V]
    w_f = adapter.ln_final().weight.float()  # [d]
    G = W_U @ W_E  # [d, d]
    out = torch.zeros(s.n_layers, s.n_heads)
    for layer in range(s.n_layers):
        w = adapter.weights(layer)
        w_a = adapter.ln_attn(layer).weight.float()
        P = w_f[:, None] * G * w_a[None, :]  # diag(w_f) W_U W_E diag(w_a)
        W_V = w.W_V.float()[w.kv_of_head]  # [H, d, D]
        M = w.W_O.float() @ P @ W_V  # [H, D, D]
        eig = torch.linalg.eigvals(M)  # [H, D] complex
        out[layer] = eig.sum(-1).real / eig.abs().sum(-1).clamp_min(1e-12)
    return out
