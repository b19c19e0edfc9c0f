"""The one model adapter: any supported Hugging Face causal LM, seen per layer and per head."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import nn

from headscope.model import capture as cap
from headscope.model.loading import ResolvedModel, describe, load_hf, resolve
from headscope.model.records import Capture, HeadWeights, NormWeights
from headscope.model.spec import ArchSpec, arch_spec, get_module, head_name, norm_factor
from headscope.model.tokens import Tokens


class _Stop(Exception):
    """Ends a forward pass early (``ModelAdapter.run(stop_after=...)``); never escapes ``run``."""


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _per_adapter(method: _Method) -> _Method:
    """Cache a method's results on the adapter itself, so they go when the adapter goes.

    ``functools.cache`` on a method keeps one class-wide table keyed by ``self``: every adapter
    (and its model) that ever called it stayed alive for the life of the process.
    """

    @functools.wraps(method)
    def cached(self: ModelAdapter, *args: Any) -> Any:
        key = (method.__name__, *args)
        if key not in self._cache:
            self._cache[key] = method(self, *args)
        return self._cache[key]

    return cast(_Method, cached)


def _linear_weight(mod: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [in, out], b [out]) of an ``nn.Linear`` or GPT-2's ``Conv1D``, in ``x @ W`` form."""
    if isinstance(mod, nn.Linear):
        return mod.weight.T, mod.bias
    return mod.weight, mod.bias  # Conv1D stores [in, out]


class ModelAdapter:
    """Any supported causal LM: sizes, per-head weights, norms, RoPE and a capture API."""

    def __init__(
        self, model: Any, tokenizer, *, name: str, source: str, bos_token: str | None = None
    ):
        cap.register()
        model.set_attn_implementation(cap.ATTN_NAME)
        # Hugging Face modules are reached by attribute paths: typed as Any at this boundary.
        self.model: Any = model
        self.name = name
        self.source = source
        self.spec: ArchSpec = arch_spec(model)
        self.tokens = Tokens(tokenizer, bos_token)
        self._layers: Any = get_module(model, self.spec.layout.layers)
        # Modules whose weights accelerate keeps on disk or CPU until they run (a sharded model).
        self._offloaded: list[nn.Module] = []
        if getattr(model, "hf_device_map", None) is not None:
            from accelerate.utils import has_offloaded_params

            self._offloaded = [m for m in model.modules() if has_offloaded_params(m)]
        # weights, norms and embeddings derived from the model, filled on first use
        self._cache: dict[tuple, Any] = {}

    @classmethod
    def load(
        cls, name: str = "default", *, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ModelAdapter:
        """Load ``default``, ``gemma-3-270m``, a local HF directory, a ``.gguf`` or a hub name."""
        resolved: ResolvedModel = resolve(name)
        model, tok = load_hf(resolved, dtype=dtype, device=device)
        return cls(
            model, tok, name=resolved.name, source=resolved.source, bos_token=resolved.bos_token
        )

    # ----- sizes and names -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go (for a sharded model: the device its embedding runs on)."""
        if getattr(self.model, "hf_device_map", None) is not None:
            from headscope.model.placement import input_device

            return input_device(self.model)
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def _materialised(self, module: nn.Module) -> Iterator[None]:
        """Within this block ``module``'s weights are real tensors, also where accelerate
        offloads them (read from CPU or disk as for a forward pass). A tensor taken from them
        inside the block stays valid after it (accelerate puts a placeholder back in the module,
        the tensor keeps the weights it read)."""
        with contextlib.ExitStack() as stack:
            offloaded = [
                m
                for m in self._offloaded
                if any(x is module for x in m.modules()) or any(x is m for x in module.modules())
            ]
            if offloaded:
                from accelerate.utils import align_module_device

                for m in offloaded:
                    stack.enter_context(align_module_device(m))
            yield

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def head_names(self) -> list[str]:
        return [
            head_name(lay, h) for lay in range(self.spec.n_layers) for h in range(self.spec.n_heads)
        ]

    def info(self) -> dict:
        """Architecture summary (what ``headscope info`` prints)."""
        s = self.spec
        return {
            "name": self.name,
            "model": describe(self.name, self.source),
            "source": self.source,
            **s.to_dict(),
            "n_heads_total": s.n_heads_total,
            "bos_token": self.tokens.bos_token,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ----- modules -----------------------------------------------------------------------------
    def layer(self, layer: int) -> Any:
        return self._layers[layer]

    def attn(self, layer: int) -> Any:
        return getattr(self._layers[layer], self.spec.layout.attn)

    def _norm_weights(self, mod: Any) -> NormWeights:
        with self._materialised(mod):
            w = mod.weight.detach() + self.spec.norm.weight_offset
            bias = getattr(mod, "bias", None)
            return NormWeights(w, None if bias is None else bias.detach())

    @_per_adapter
    def ln_attn(self, layer: int) -> NormWeights:
        return self._norm_weights(getattr(self._layers[layer], self.spec.layout.ln_attn))

    @_per_adapter
    def ln_final(self) -> NormWeights:
        return self._norm_weights(get_module(self.model, self.spec.layout.final_norm))

    @_per_adapter
    def qk_norm(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Effective QK-norm weights (q [D], k [D]) or None for models without QK-norm."""
        lay = self.spec.layout
        if lay.q_norm is None or lay.k_norm is None:
            return None
        attn = self.attn(layer)
        off = self.spec.norm.weight_offset
        with self._materialised(attn):
            return (
                getattr(attn, lay.q_norm).weight.detach() + off,
                getattr(attn, lay.k_norm).weight.detach() + off,
            )

    @_per_adapter
    def post_norm(self, layer: int, which: str) -> NormWeights | None:
        """Gemma's post-attention (``"attn"``) or post-MLP (``"mlp"``) norm, else None."""
        path = (
            self.spec.layout.post_attn_norm if which == "attn" else self.spec.layout.post_mlp_norm
        )
        if path is None:
            return None
        return self._norm_weights(getattr(self._layers[layer], path))

    @_per_adapter
    def unembed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_U [d_model, V] and b_U [V] (or None)."""
        head = get_module(self.model, self.spec.layout.unembed)
        with self._materialised(head):
            bias = None if head.bias is None else head.bias.detach()
            return head.weight.detach().T, bias

    @_per_adapter
    def embed_matrix(self) -> torch.Tensor:
        """W_E [V, d_model] as the model adds it (Gemma's sqrt(d_model) scale included)."""
        emb = get_module(self.model, self.spec.layout.embed)
        scale = getattr(emb, "embed_scale", None)
        with self._materialised(emb):
            w = emb.weight.detach()
        return w * scale.to(w.dtype) if scale is not None else w

    @_per_adapter
    def weights(self, layer: int) -> HeadWeights:
        """Head-major W_Q, W_K, W_V, W_O (+ biases) of one layer."""
        with self._materialised(self.attn(layer)):
            return self._weights(layer)

    def _weights(self, layer: int) -> HeadWeights:
        s, lay = self.spec, self.spec.layout
        attn = self.attn(layer)
        H, KV, D, d = s.n_heads, s.n_kv_heads, s.d_head, s.d_model
        if lay.qkv == "separate":
            parts = [_linear_weight(getattr(attn, n)) for n in (lay.q, lay.k, lay.v)]
        elif lay.qkv == "gpt2_fused":
            w, b = _linear_weight(getattr(attn, lay.q))  # [d, 3 H D]
            ws, bs = w.split(H * D, dim=1), b.split(H * D) if b is not None else (None,) * 3
            parts = list(zip(ws, bs, strict=True))
        else:  # neox_fused: output viewed as [H, 3, D] (q, k, v interleaved per head)
            w, b = _linear_weight(getattr(attn, lay.q))  # [d, H*3*D]
            w4 = w.reshape(d, H, 3, D)
            b4 = b.reshape(H, 3, D) if b is not None else None
            parts = [
                (w4[:, :, i].reshape(d, H * D), None if b4 is None else b4[:, i].reshape(H * D))
                for i in range(3)
            ]

        def head_major(wb, n):  # [d, n*D] -> [n, d, D]; bias -> [n, D]
            w_, b_ = wb
            w_ = w_.detach().reshape(d, n, D).permute(1, 0, 2).contiguous()
            b_ = (
                torch.zeros(n, D, dtype=w_.dtype, device=w_.device)
                if b_ is None
                else b_.detach().reshape(n, D)
            )
            return w_, b_

        (wq, bq), (wk, bk), (wv, bv) = (
            head_major(parts[0], H),
            head_major(parts[1], KV),
            head_major(parts[2], KV),
        )
        wo, bo = _linear_weight(getattr(attn, lay.out))  # [H*D, d]
        wo = wo.detach().reshape(H, D, d).contiguous()
        bo = torch.zeros(d, dtype=wo.dtype, device=wo.device) if bo is None else bo.detach()
        kv_of_head = torch.arange(H, device=wo.device) // (H // KV)
        return HeadWeights(wq, bq, wk, bk, wv, bv, wo, bo, kv_of_head)

    @_per_adapter
    def output_basis(self, layer: int) -> torch.Tensor:
        """``U S`` of each head's ``W_O[h] = U S V^T``: ``[H, D, D]``.

        ``v @ U S`` is ``v @ W_O[h]`` written in the orthonormal basis ``V^T`` of W_O's row
        space: the same norms and geometry as the d_model-wide output at D/d_model of the cost."""
        U, S, _ = torch.linalg.svd(self.weights(layer).W_O.float(), full_matrices=False)
        return U * S[:, None, :]

    # ----- linear pieces (used by attribution) -------------------------------------------------
    def apply_norm_frozen(
        self, x: torch.Tensor, factor: torch.Tensor, norm: NormWeights
    ) -> torch.Tensor:
        """The norm as a linear map with its scale frozen: ``x [..., d]`` -> ``[..., d]``.

        ``factor`` is ``1/rms`` (``1/std``) measured on the full input; LayerNorm's centring is
        linear and kept; its bias is not added (it is a separate bias term)."""
        if self.spec.norm.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        return x * factor * norm.weight

    @staticmethod
    def apply_rope(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
    ) -> torch.Tensor:
        """Rotate the first ``rotary_dim`` dims of ``x [..., D]`` (rotate-half convention) with
        ``cos``/``sin`` broadcastable to ``[..., rotary_dim]``."""
        if rotary_dim == 0:
            return x
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        half = rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)

    # ----- running -----------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        tokens: torch.Tensor,  # [B, T] token ids
        *,
        layers: list[int] | None = None,
        patterns: bool = True,
        residuals: bool = False,
        logits: bool = True,
        store: bool = True,
        on_layer: Callable[[cap.LayerTensors], None] | None = None,
        resid_layers: Collection[int] = (),
        stop_after: int | None = None,
        resume: Capture | None = None,
    ) -> Capture:
        """One forward pass capturing attention internals of ``layers`` (all when None).

        ``patterns``: compute scores and patterns for those layers (else fused SDPA).
        ``residuals``: also capture embeddings, every layer's residual input, attention and MLP
        contributions, and RoPE cos/sin (what attribution needs).
        ``resid_layers``: capture only the residual stream entering these layers
        (``Capture.resid_pre``), nothing else of the residual stream.
        ``logits=False`` skips the unembedding (the precompute does not need it).
        ``store=False`` keeps nothing in memory: use ``on_layer`` to reduce each layer as it runs.
        ``stop_after``: end the pass once layer ``stop_after`` has run (-1: right after the
        embeddings); nothing after it is computed, but the residual entering the next layer is
        still captured when asked for. Needs ``logits=False``.
        ``resume``: a capture of the same tokens that stopped early (``residuals=True``); this
        pass starts from the residual it kept and runs only the layers after its
        ``stopped_after`` (the layers before return that residual without computing). The
        result holds the resumed capture's tensors plus the new layers' and is bit-identical to
        one uninterrupted pass; ``resume`` itself is not changed.
        """
        n_layers = self.spec.n_layers
        if stop_after is not None:
            if not -1 <= stop_after < n_layers:
                raise ValueError(f"stop_after must be in -1..{n_layers - 1}, got {stop_after}")
            if logits:
                raise ValueError("a pass that stops early computes no logits: pass logits=False")
        start = 0
        if resume is not None:
            if resume.stopped_after is None:
                raise ValueError("this capture ran to the end: there is nothing to resume")
            if not residuals or logits:
                raise ValueError("a resumed pass needs residuals=True and logits=False")
            if not torch.equal(tokens.to(resume.tokens.device), resume.tokens):
                raise ValueError("a resumed pass must run on the tokens of the capture it resumes")
            start = resume.stopped_after + 1
            if stop_after is not None and stop_after < start:
                raise ValueError(f"the capture already ran layer {stop_after}")
        tokens = tokens.to(self.device)
        req = cap.CaptureRequest(
            layers=None if layers is None else frozenset(layers),
            patterns=patterns,
            on_layer=on_layer,
            store=store,
        )
        out = Capture(tokens=tokens) if resume is None else resume.continued()
        out.stopped_after = stop_after
        req.results.update(out.layers)
        if resume is not None and start == n_layers:  # resid_final was kept: nothing left to run
            return out
        if residuals:
            handles = self._residual_hooks(out, start)
            if start > 0:
                handles += self._skip_layers(start, out.resid_pre[start])
        else:
            handles = [self._keep_resid_pre(out, layer) for layer in sorted(set(resid_layers))]
        if stop_after is not None:  # registered last: the capture hooks of the next module run
            handles.append(self._stop_hook(stop_after))
        try:
            with cap.capturing(req):
                if logits:
                    result = self.model(input_ids=tokens, use_cache=False)
                    out.logits = result.logits
                else:
                    self.model.base_model(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        out.layers = req.results
        return out

    def _keep_resid_pre(self, out: Capture, layer: int) -> Any:
        def pre(_mod, args, kwargs):
            out.resid_pre[layer] = args[0] if args else kwargs["hidden_states"]

        return self._layers[layer].register_forward_pre_hook(pre, with_kwargs=True)

    def _stop_hook(self, stop_after: int) -> Any:
        """A pre-hook on what runs after layer ``stop_after`` (the next layer or the final norm)
        that ends the pass."""
        nxt = stop_after + 1
        module = (
            self._layers[nxt]
            if nxt < self.spec.n_layers
            else get_module(self.model, self.spec.layout.final_norm)
        )

        def stop(_mod, _args):
            raise _Stop

        return module.register_forward_pre_hook(stop)

    def _skip_layers(self, n: int, hidden: torch.Tensor) -> list:
        """Make layers ``0..n-1`` return ``hidden`` (the residual entering layer ``n``) without
        computing, until the returned handles are removed: the model's own loop then hands layer
        ``n`` exactly the input it had in the pass that stopped before it."""
        return [_Replaced(self._layers[i], lambda *_a, **_k: hidden) for i in range(n)]

    def _residual_hooks(self, out: Capture, start: int = 0) -> list:
        """Hooks keeping the residual stream's pieces of layers ``start..`` (and the embeddings
        when ``start`` is 0) in ``out``."""
        s, lay = self.spec, self.spec.layout
        hooks = []

        def keep(store: dict | None, key, attr: str | None = None):
            def hook(_mod, _args, output):
                value = output[0] if isinstance(output, tuple) else output
                if store is None:
                    setattr(out, attr, value)  # type: ignore[arg-type]
                else:
                    store[key] = value

            return hook

        if start == 0:
            emb = get_module(self.model, lay.embed)
            hooks.append(emb.register_forward_hook(keep(None, None, "embed")))
            if lay.pos_embed is not None:
                hooks.append(
                    get_module(self.model, lay.pos_embed).register_forward_hook(
                        keep(None, None, "pos_embed")
                    )
                )
        for i in range(start, s.n_layers):
            block = self._layers[i]

            def pre(_mod, args, kwargs, i=i):
                out.resid_pre[i] = args[0] if args else kwargs["hidden_states"]

            def rope_pre(_mod, _args, kwargs, i=i):
                pe = kwargs.get("position_embeddings")
                if pe is not None:
                    out.rope[i] = pe

            hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            attn = getattr(block, lay.attn)
            hooks.append(attn.register_forward_pre_hook(rope_pre, with_kwargs=True))
            hooks.append(getattr(attn, lay.out).register_forward_hook(keep(out.attn_out, i)))
            if lay.post_attn_norm:
                hooks.append(
                    getattr(block, lay.post_attn_norm).register_forward_hook(
                        keep(out.attn_contrib, i)
                    )
                )
            mlp_src = lay.post_mlp_norm or lay.mlp
            hooks.append(getattr(block, mlp_src).register_forward_hook(keep(out.mlp_contrib, i)))

        def final_pre(_mod, args, kwargs):
            out.resid_final = args[0] if args else kwargs["hidden_states"]

        hooks.append(
            get_module(self.model, lay.final_norm).register_forward_pre_hook(
                final_pre, with_kwargs=True
            )
        )
        return hooks

    # ----- derived per-head quantities ---------------------------------------------------------
    def head_outputs(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Per-head outputs ``z_h @ W_O[h]``: ``z [..., H, D]`` -> ``[..., H, d_model]``."""
        w = self.weights(layer)
        return torch.einsum("...hd,hdm->...hm", z.to(w.W_O.dtype), w.W_O)

    def post_attn_factor(self, attn_out: torch.Tensor, layer: int) -> torch.Tensor | None:
        """Gemma's post-attention norm, frozen: ``attn_out [..., d]`` -> factor ``[..., d]``
        such that the residual receives ``attn_out * factor``; None without a post-norm."""
        norm = self.post_norm(layer, "attn")
        if norm is None:
            return None
        return norm_factor(attn_out, self.spec.norm).to(attn_out.dtype) * norm.weight


class _Replaced:
    """A module whose ``forward`` is replaced until :meth:`remove` (the interface of a hook
    handle). An instance-level ``forward`` already there (accelerate's offload hooks put one
    there) is put back."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]):
        self.module = module
        self.previous = module.__dict__.get("forward")
        module.forward = forward  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous  # type: ignore[method-assign]


def timed_load(name: str = "default", **kwargs) -> tuple[ModelAdapter, float]:
    """Load a model and return it with the seconds the load took."""
    t0 = time.perf_counter()
    adapter = ModelAdapter.load(name, **kwargs)
    return adapter, time.perf_counter() - t0
