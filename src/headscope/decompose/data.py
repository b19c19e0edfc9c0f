"""What one attention layer sees and does over a set of contexts, captured once for training.

Every decomposition here trains on full contexts (a feature moved from one position to another
needs both), so the unit of data is a context: a row of token ids ``[T]`` with the BOS token at
position 0. :func:`capture_layer` runs the model once per batch of contexts through the
adapter's capture (stopping after the layer) and keeps, for that one layer:

==============  =================  ===============================================================
field           shape              what
==============  =================  ===============================================================
``ids``         ``[N, T]``         token ids (BOS at 0)
``resid``       ``[N, T, d]``      the residual stream entering the layer
``resid_post``  ``[N, T, d]``      the residual stream entering the next layer (None: last layer)
``attn_out``    ``[N, T, d]``      the attention output, ``Σ_h z_h W_O[h] + b_O``
``pattern``     ``[N, H, T, T]``   attention patterns (float32, query-major)
``q``           ``[N, H, T, D]``   queries (post-RoPE, post-QK-norm)
``k``           ``[N, KV, T, D]``  keys (post-RoPE, post-QK-norm)
``z``           ``[N, T, H, D]``   per-head outputs before W_O
``rope``        ``[T, R]`` x 2     the layer's RoPE cos and sin (None without RoPE)
==============  =================  ===============================================================

All tensors are float32 on one device. Losses and statistics are taken at destination positions
1..T-1 (the BOS position is every head's sink and has nothing to reconstruct); position 0 still
takes part as a source.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headscope.errors import DataError, InputError
from headscope.files import atomic_dir, read_json, read_tensors, write_json, write_tensors
from headscope.model import ModelAdapter

_TENSORS = ("ids", "resid", "resid_post", "attn_out", "pattern", "q", "k", "z")


@dataclass(frozen=True)
class LayerData:
    """One layer's inputs, internals and outputs over ``N`` contexts of ``T`` tokens."""

    layer: int
    ids: Tensor  # [N, T] long
    resid: Tensor  # [N, T, d]
    resid_post: Tensor | None  # [N, T, d]
    attn_out: Tensor  # [N, T, d]
    pattern: Tensor  # [N, H, T, T]
    q: Tensor  # [N, H, T, D]
    k: Tensor  # [N, KV, T, D]
    z: Tensor  # [N, T, H, D]
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin [T, R]

    @property
    def n_contexts(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Destination positions a loss is taken over: ``N · (T - 1)``."""
        return self.n_contexts * (self.n_ctx - 1)

    def select(self, index: Tensor | slice) -> LayerData:
        """The contexts ``index`` (a slice or a long tensor of context indices)."""
        out: dict[str, Any] = {}
        for name in _TENSORS:
            t = getattr(self, name)
            out[name] = None if t is None else t[index]
        return replace(self, **out)

    def split(self, n_eval: int) -> tuple[LayerData, LayerData]:
        """(train, eval): the last ``n_eval`` contexts are held out."""
        if not 0 < n_eval < self.n_contexts:
            raise InputError(
                f"n_eval must be in 1..{self.n_contexts - 1} (there are {self.n_contexts} "
                f"contexts), got {n_eval}"
            )
        cut = self.n_contexts - n_eval
        return self.select(slice(0, cut)), self.select(slice(cut, None))

    def to(self, device: torch.device | str) -> LayerData:
        out: dict[str, Any] = {}
        for name in _TENSORS:
            t = getattr(self, name)
            out[name] = None if t is None else t.to(device)
        rope = None if self.rope is None else (self.rope[0].to(device), self.rope[1].to(device))
        return replace(self, rope=rope, **out)

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> Iterator[LayerData]:
        """Minibatches of ``batch_size`` contexts, shuffled when a generator is given."""
        n = self.n_contexts
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self.select(order[start : start + batch_size].to(self.ids.device))


def contexts_from_rows(rows: list[Tensor] | Tensor, n_ctx: int | None = None) -> Tensor:
    """Stack token-id rows of one length into ``[N, T]``; rows of another length are dropped.

    ``n_ctx``: the length to keep (default: the first row's)."""
    if isinstance(rows, Tensor):
        rows = list(rows)
    if not rows:
        raise DataError("no contexts to train on")
    n_ctx = n_ctx or int(rows[0].shape[0])
    kept = [r for r in rows if int(r.shape[0]) == n_ctx]
    if not kept:
        raise DataError(f"no context has {n_ctx} tokens")
    return torch.stack(kept).long()


@torch.no_grad()
def capture_layer(
    adapter: ModelAdapter,
    ids: Tensor,  # [N, T] long, BOS at position 0
    layer: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> LayerData:
    """Run ``ids`` through the model (stopping after ``layer``) and keep that layer's data.

    The tensors end up float32 on ``device``."""
    s = adapter.spec
    if not 0 <= layer < s.n_layers:
        raise InputError(f"layer must be in 0..{s.n_layers - 1}, got {layer}")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise InputError(f"ids must be [N, T] with T >= 2, got shape {list(ids.shape)}")
    w = adapter.weights(layer)
    has_next = layer + 1 < s.n_layers
    parts: dict[str, list[Tensor]] = {name: [] for name in _TENSORS if name != "ids"}
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start : start + batch_size]
        cap = adapter.run(
            chunk,
            layers=[layer],
            patterns=True,
            logits=False,
            resid_layers=[layer, layer + 1] if has_next else [layer],
            stop_after=layer,
        )
        t = cap.layers[layer]
        assert t.pattern is not None
        head_out = adapter.head_outputs(t.z, layer)  # [B, T, H, d]
        got = {
            "resid": cap.resid_pre[layer],
            "resid_post": cap.resid_pre[layer + 1] if has_next else None,
            "attn_out": head_out.sum(-2) + w.b_O,
            "pattern": t.pattern,
            "q": t.q,
            "k": t.k,
            "z": t.z,
        }
        for name, value in got.items():
            if value is not None:
                parts[name].append(value.detach().to(device=device, dtype=torch.float32))
    rope = None
    if s.positional == "rope" and s.rotary_dim:
        cap = adapter.run(
            ids[:1], layers=[layer], patterns=False, logits=False, residuals=True, stop_after=layer
        )
        if layer in cap.rope:
            cos, sin = cap.rope[layer]
            rope = (cos[0].to(device, torch.float32), sin[0].to(device, torch.float32))
    cat = {name: torch.cat(ts) if ts else None for name, ts in parts.items()}
    return LayerData(layer=layer, ids=ids.to(device), rope=rope, **cat)  # type: ignore[arg-type]


def save_layer_data(data: LayerData, path: str | os.PathLike[str]) -> Path:
    """Cache ``data`` as ``layer.json`` + ``layer.safetensors`` in folder ``path``."""
    path = Path(path)
    tensors = {
        n: getattr(data, n).contiguous().cpu() for n in _TENSORS if getattr(data, n) is not None
    }
    if data.rope is not None:
        tensors["rope_cos"], tensors["rope_sin"] = (t.contiguous().cpu() for t in data.rope)
    with atomic_dir(path) as tmp:
        write_tensors(tmp / "layer.safetensors", tensors)
        write_json(tmp / "layer.json", {"layer": data.layer}, indent=2)
    return path


def load_layer_data(path: str | os.PathLike[str], *, device: str = "cpu") -> LayerData:
    """Read a folder written by :func:`save_layer_data`."""
    path = Path(path)
    if not (path / "layer.json").is_file() or not (path / "layer.safetensors").is_file():
        raise DataError(f"{path} is not a layer-data folder (layer.json + layer.safetensors)")
    meta = read_json(path / "layer.json")
    t = read_tensors(path / "layer.safetensors")
    rope = (t.pop("rope_cos"), t.pop("rope_sin")) if "rope_cos" in t else None
    names = {f.name for f in fields(LayerData)}
    kw = {n: t.get(n) for n in _TENSORS if n in names}
    return LayerData(layer=int(meta["layer"]), rope=rope, **kw).to(device)  # type: ignore[arg-type]
