"""A live-analysis session: one model, and a byte-bounded LRU cache of analysed texts.

A text is run once with every layer's q, k, v, z and the residual decomposition captured (no
full patterns: they are O(T^2) per head); pattern rows are recomputed on demand from q and k,
with exactly the arithmetic of the forward pass. Another (query, key) pair on a cached text
costs no forward pass.

Memory: a cached text costs about ``(2 * H + 2 * KV) * D + 3 * d_model`` floats per token and
layer (~390 kB per token on SmolLM2-135M: 100 MB for 256 tokens, 800 MB for 2048), so the cache
is bounded in bytes (:data:`CACHE_BYTES`); texts are evicted before a new one runs, and what a
forward pass freed goes back to the operating system after it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from headscope.analysis.inputs import encode_text
from headscope.errors import InputError
from headscope.limits import MAX_TOKENS
from headscope.memory import release_freed_memory
from headscope.model import Capture, ModelAdapter
from headscope.model.capture import eager_attention

# The text cache's budget: two or three texts of a few hundred tokens on the default model (the
# one being looked at and the ones before); the latest text is kept whatever its size.
CACHE_BYTES = 256 << 20


@dataclass
class TextState:
    text: str
    ids: torch.Tensor  # [1, T]
    tokens: list[str]  # display strings
    cap: Capture
    nbytes: int

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[1]


def _nbytes(cap: Capture) -> int:
    total = 0
    for value in vars(cap).values():
        items = value.values() if isinstance(value, dict) else [value]
        for item in items:
            if torch.is_tensor(item):
                total += item.numel() * item.element_size()
            elif isinstance(item, tuple):
                total += sum(t.numel() * t.element_size() for t in item if torch.is_tensor(t))
            elif item is not None and hasattr(item, "q"):
                total += sum(t.numel() * t.element_size() for t in (item.q, item.k, item.v, item.z))
    return total


class Session:
    """The model plus a cache of analysed texts; thread-safe (model calls are serialised).

    ``cache_bytes``: the cache's budget (the latest text is kept whatever its size)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        max_tokens: int = MAX_TOKENS,
        cache_bytes: int = CACHE_BYTES,
    ):
        if adapter.dtype != torch.float32:
            raise ValueError("live analysis needs the model in float32 (exact attributions)")
        self.adapter = adapter
        limit = adapter.spec.max_positions
        self.max_tokens = min(max_tokens, limit) if limit else max_tokens
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str | tuple[int, ...], TextState] = OrderedDict()
        self._lock = threading.Lock()

    def state(self, text: str | list[int]) -> TextState:
        """The analysed state of a text (or of token ids, BOS included), cached or computed."""
        key = text if isinstance(text, str) else tuple(text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if isinstance(text, str):
                ids = encode_text(self.adapter, text, self.max_tokens)
            else:
                if not 1 <= len(text) <= self.max_tokens:
                    raise InputError(f"need 1..{self.max_tokens} token ids, got {len(text)}")
                ids = torch.tensor([list(text)], dtype=torch.long)
            # Room first, so the evicted texts and the new one are never held together.
            self._evict(self.cache_bytes - self._estimate(ids.shape[1]))
            # No logits kept (V floats per position): logits_at() recomputes one position.
            cap = self.adapter.run(ids, patterns=False, residuals=True, logits=False)
            display = self.adapter.tokens.displays(ids[0])
            st = TextState(
                text if isinstance(text, str) else "".join(display), ids, display, cap, _nbytes(cap)
            )
            self._evict(self.cache_bytes - st.nbytes)
            self._cache[key] = st
            release_freed_memory()
            return st

    def _estimate(self, n_tokens: int) -> int:
        """The bytes a text of ``n_tokens`` will take, scaled from a cached one (0: none)."""
        for st in self._cache.values():
            return st.nbytes * n_tokens // st.n_tokens
        return 0

    def _evict(self, budget: int) -> None:
        """Drop the least recently used texts until the cache holds at most ``budget`` bytes."""
        used = sum(st.nbytes for st in self._cache.values())
        while used > budget and self._cache:
            _, old = self._cache.popitem(last=False)
            used -= old.nbytes

    def logits_at(self, st: TextState, pos: int) -> torch.Tensor:
        """The model's logits ``[V]`` at ``pos``: final norm, unembedding, final softcap."""
        from headscope.model.spec import get_module

        ad = self.adapter
        with torch.no_grad():
            x = get_module(ad.model, ad.spec.layout.final_norm)(st.cap.get("resid_final")[:, pos])
            logits = get_module(ad.model, ad.spec.layout.unembed)(x)[0]
        cap = ad.spec.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    # ----- attention rows ---------------------------------------------------------------------
    def pattern_rows(
        self, st: TextState, layer: int, q_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and pattern of every head of ``layer`` at query ``q_pos``: ``[H, q_pos+1]`` each.

        Recomputed from the captured q and k with the forward pass's own arithmetic."""
        s = self.adapter.spec
        t = st.cap.layers[layer]
        q = t.q[:, :, q_pos : q_pos + 1]  # [1, H, 1, D]
        k = t.k[:, :, : q_pos + 1]  # [1, KV, q_pos+1, D]
        v = t.v[:, :, : q_pos + 1]
        scores, pattern, _ = eager_attention(
            q, k, v, None, s.attn_scale, s.attn_softcap, s.sliding_window[layer]
        )
        return scores[0, :, 0], pattern[0, :, 0]

    # ----- residual decomposition ---------------------------------------------------------------
    def resid(self, st: TextState, layer: int, pos: int) -> torch.Tensor:
        """The actual residual entering ``layer`` (``n_layers``: the final norm's input) ``[d]``."""
        if layer == self.adapter.spec.n_layers:
            return st.cap.get("resid_final")[0, pos]
        return st.cap.resid_pre[layer][0, pos]

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.adapter.spec.n_layers:
            raise InputError(f"layer {layer} out of range 0..{self.adapter.spec.n_layers - 1}")
