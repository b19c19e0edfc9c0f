"""A live-analysis session: one model, and a byte-bounded LRU cache of analysed texts.

A text is run with every layer's q, k, v, z and the residual decomposition captured (no full
patterns: they are O(T^2) per head); pattern rows are recomputed on demand from q and k, with
exactly the arithmetic of the forward pass. Another (query, key) pair on a cached text costs no
forward pass.

The state of a text is resumable: a request that needs only layers ``0..l`` (a head's QK
attribution) runs the forward pass up to layer ``l`` and keeps what it captured, residual
entering layer ``l + 1`` included; a later request for a deeper layer continues from there
(``ModelAdapter.run(resume=...)``), with the same bits as one uninterrupted pass.

Concurrency: cache look-ups never wait for a forward pass (one lock for the cache, another
for the model), and :func:`cached_only` lets a server answer what the cache already holds on
other threads while the model runs: inside it, any forward pass raises :class:`NeedsModel`.

Memory: a cached text costs about ``(2 * H + 2 * KV) * D + 3 * d_model`` floats per token and
layer (~400 kB per token on SmolLM2-135M-Instruct: 100 MB for 256 tokens, 800 MB for 2048), so
the cache is bounded in bytes (:data:`CACHE_BYTES`); texts are evicted before a new one runs, and
what a forward pass freed goes back to the operating system after it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


class NeedsModel(Exception):
    """Raised inside :func:`cached_only` by anything that would run the model."""


_CACHED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "headscope_cached_only", default=False
)


@contextlib.contextmanager
def cached_only() -> Iterator[None]:
    """Within this block (on this thread), work that needs a forward pass raises
    :class:`NeedsModel` instead of running it: what the text cache holds is answered, the rest
    can be handed to the thread that owns the model."""
    token = _CACHED_ONLY.set(True)
    try:
        yield
    finally:
        _CACHED_ONLY.reset(token)


def _refuse_in_cached_only(_module: Any, _args: Any) -> None:
    if _CACHED_ONLY.get():
        raise NeedsModel


def _guard_model(adapter: ModelAdapter) -> None:
    """Every forward pass goes through the base model: one pre-hook there enforces
    :func:`cached_only` for all of them (the session's, attend's, interventions', ...)."""
    base = adapter.model.base_model
    if not getattr(base, "_headscope_cached_only_guard", False):
        base.register_forward_pre_hook(_refuse_in_cached_only)
        base._headscope_cached_only_guard = True


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

    @property
    def layers_run(self) -> int | None:
        """How many layers the captured pass has run (None: all, final residual included)."""
        stopped = self.cap.stopped_after
        return None if stopped is None else stopped + 1

    def covers(self, through: int | None) -> bool:
        """Whether layers ``0..through`` (None: the whole pass) have been captured."""
        run = self.layers_run
        return run is None or (through is not None and through < run)


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
    """The model plus a cache of analysed texts; thread-safe (forward passes are serialised,
    cache hits never wait for one).

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
        if max_tokens < 2:
            raise InputError(
                f"the token limit must be at least 2 (BOS and a token), got {max_tokens}"
            )
        self.adapter = adapter
        limit = adapter.spec.max_positions
        self.max_tokens = min(max_tokens, limit) if limit else max_tokens
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str | tuple[int, ...], TextState] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._model_lock = threading.Lock()  # forward passes
        _guard_model(adapter)

    def cached(self, text: str | list[int], through: int | None = None) -> TextState | None:
        """The cached state of a text if it covers layers ``0..through`` (None: all), else None;
        never runs the model."""
        key = text if isinstance(text, str) else tuple(text)
        with self._lock:
            st = self._cache.get(key)
            if st is None or not st.covers(through):
                return None
            self._cache.move_to_end(key)
            return st

    def state(self, text: str | list[int], through: int | None = None) -> TextState:
        """The analysed state of a text (or of token ids, BOS included), cached or computed.

        ``through``: the deepest layer the caller reads (None: every layer and the final
        residual); the forward pass runs that far, or continues a cached state that far."""
        st = self.cached(text, through)
        if st is not None:
            return st
        if _CACHED_ONLY.get():
            raise NeedsModel
        key = text if isinstance(text, str) else tuple(text)
        with self._model_lock:
            with self._lock:
                st = self._cache.get(key)
                if st is not None:
                    self._cache.move_to_end(key)
                    if st.covers(through):  # another thread ran it meanwhile
                        return st
            st = self._compute(text, key, st, through)
            release_freed_memory()
            return st

    def _compute(
        self,
        text: str | list[int],
        key: str | tuple[int, ...],
        old: TextState | None,
        through: int | None,
    ) -> TextState:
        """Run (or continue ``old``) up to layer ``through``; cache and return the new state."""
        if old is not None:
            ids = old.ids
        elif isinstance(text, str):
            ids = encode_text(self.adapter, text, self.max_tokens)
        else:
            if not 1 <= len(text) <= self.max_tokens:
                raise InputError(f"need 1..{self.max_tokens} token ids, got {len(text)}")
            ids = torch.tensor([list(text)], dtype=torch.long)
        n_layers = self.adapter.spec.n_layers
        stop = None if through is None or through >= n_layers - 1 else through
        # Room first, so the evicted texts and the new one are never held together.
        with self._lock:
            have = old.nbytes if old is not None else 0
            need = self._estimate(ids.shape[1], n_layers if stop is None else stop + 1) - have
            self._evict(self.cache_bytes - need, keep=key)
        # No logits kept (V floats per position): logits_at() recomputes one position.
        cap = self.adapter.run(
            ids,
            patterns=False,
            residuals=True,
            logits=False,
            stop_after=stop,
            resume=old.cap if old is not None else None,
        )
        if old is not None:
            st = TextState(old.text, ids, old.tokens, cap, _nbytes(cap))
        else:
            display = self.adapter.tokens.displays(ids[0])
            name = text if isinstance(text, str) else "".join(display)
            st = TextState(name, ids, display, cap, _nbytes(cap))
        with self._lock:
            self._cache.pop(key, None)
            self._evict(self.cache_bytes - st.nbytes)
            self._cache[key] = st
        return st

    def _estimate(self, n_tokens: int, n_layers: int) -> int:
        """The bytes a text of ``n_tokens`` run through ``n_layers`` layers will take, scaled
        from a cached one (0: none)."""
        for st in self._cache.values():
            run = st.layers_run or self.adapter.spec.n_layers
            return st.nbytes * n_tokens * n_layers // (st.n_tokens * run)
        return 0

    def _evict(self, budget: int, keep: object = None) -> None:
        """Drop the least recently used texts (but not ``keep``) until the cache holds at most
        ``budget`` bytes."""
        used = sum(st.nbytes for st in self._cache.values())
        for key in list(self._cache):
            if used <= budget:
                break
            if key != keep:
                used -= self._cache.pop(key).nbytes

    def logits_at(self, st: TextState, pos: int) -> torch.Tensor:
        """The model's logits ``[V]`` at ``pos``: final norm, unembedding, final softcap."""
        from headscope.model.spec import get_module

        ad = self.adapter
        # .forward, not the module call: a pass running on another thread may have hooks on
        # these modules, and this is no forward pass of the model.
        with torch.no_grad():
            norm = get_module(ad.model, ad.spec.layout.final_norm)
            x = norm.forward(st.cap.get("resid_final")[:, pos])
            logits = get_module(ad.model, ad.spec.layout.unembed).forward(x)[0]
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

    def head_rows(
        self, st: TextState, layer: int, h: int, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Head ``h`` of ``layer``: its pattern's query rows ``start..stop-1`` (default: every
        row) over keys ``0..stop-1`` (keys after a row's query: 0), ``[stop - start, stop]``
        float32 on the CPU, recomputed from the captured q and k like :meth:`pattern_rows`."""
        s = self.adapter.spec
        t = st.cap.layers[layer]
        stop = st.n_tokens if stop is None else stop
        kv = h // (s.n_heads // s.n_kv_heads)
        _, pattern, _ = eager_attention(
            t.q[:, h : h + 1, start:stop],
            t.k[:, kv : kv + 1, :stop],
            t.v[:, kv : kv + 1, :stop],
            None,
            s.attn_scale,
            s.attn_softcap,
            s.sliding_window[layer],
        )
        return pattern[0, 0].cpu()

    # ----- residual decomposition ---------------------------------------------------------------
    def resid(self, st: TextState, layer: int, pos: int) -> torch.Tensor:
        """The actual residual entering ``layer`` (``n_layers``: the final norm's input) ``[d]``."""
        if layer == self.adapter.spec.n_layers:
            return st.cap.get("resid_final")[0, pos]
        return st.cap.resid_pre[layer][0, pos]

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.adapter.spec.n_layers:
            raise InputError(f"layer {layer} out of range 0..{self.adapter.spec.n_layers - 1}")
