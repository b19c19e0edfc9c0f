"""A page per residual dictionary feature: its label, top contexts, activation histogram, the
heads that read it (query and key side) and write it, and its nearest features by virtual weight.

Contexts and the histogram come from a slice of text the live server streams once per layer and
keeps (the residual entering the layer at every token): a served run's own data (its sequences,
sequence length and text field, :meth:`TextSource.of_run`), else ``n_tokens`` tokens of the
default corpus after the sequences the dictionary was trained on, as ``label_features`` does. A
page is then one encoder pass over that slice plus a short forward pass over the few sequences
holding its top contexts.

Readers: where the feature fires, the share of a head's query (key) vector that the feature's
own row contributes, ``|| a N(d_f) W ||`` / ``|| N(x) W + b ||`` with the norm's scale frozen at
each token's actual value (as in attributions; RoPE and QK-norm's scale change both norms alike
and are left out, QK-norm's weight is applied), averaged over the tokens where it fires most.

Writers: the direct effect of each earlier head's output on the feature's pre-activation at its
top-activating tokens, ``(z_h W_O[h]) . e_f`` (``e_f`` the encoder column), averaged.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headscope.analysis.results import FeaturePageResult
from headscope.dictionaries.basis import Dictionary, DictionarySet
from headscope.dictionaries.circuits import virtual_weights
from headscope.dictionaries.labels import MARK_CLOSE, MARK_OPEN, feature_label
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.model.spec import head_name, norm_factor
from headscope.precompute.sequences import batched, iter_sequences, stack

SEQ_LEN = 128
MAX_SKIP = 4000  # sequences skipped at most to reach text the dictionary did not train on
N_BINS = 24
READ_TOKENS = 64  # top-activating tokens the head reads/writes are averaged over
MAX_SLICES = 4  # layers whose slice a server keeps (~n_tokens x d_model floats each)


@dataclass(frozen=True)
class TextSource:
    """The text feature pages read: a dataset (None: the default corpus) in packed sequences of
    ``seq_len`` tokens. ``run``: the name of the run whose data this is; a run's text is read
    from its first sequence, at most its ``sequences``; other text starts after the sequences
    the dictionary was trained on."""

    data: Path | None = None
    seq_len: int = SEQ_LEN
    text_field: str = "text"
    sequences: int | None = None
    run: str | None = None

    @classmethod
    def of_run(cls, run_dir: str | Path) -> TextSource | None:
        """The data a precompute read, from its ``manifest.json`` (None: no manifest, or a run
        not made by a precompute, e.g. one imported from a HeadVis tree)."""
        from headscope.precompute.config import PrecomputeConfig

        manifest_path = Path(run_dir) / "manifest.json"
        if not manifest_path.is_file():
            return None
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        try:
            cfg = PrecomputeConfig.from_dict(manifest["config"])
        except (KeyError, TypeError, ValueError):
            return None
        path = (manifest.get("dataset") or {}).get("path") or cfg.data
        n = (manifest.get("tokens") or {}).get("sequences") or cfg.n_sequences
        return cls(
            data=None if path is None else Path(path),
            seq_len=cfg.seq_len,
            text_field=cfg.text_field,
            sequences=int(n),
            run=Path(run_dir).resolve().name,
        )

    def describe(self, path: Path) -> str:
        """What a page says it read: 'the run's data (corpus.jsonl, 32 sequences of 256
        tokens)'."""
        if self.run is None:
            return f"{path.name} ({self.seq_len}-token sequences)"
        n = f"{self.sequences} sequences of " if self.sequences else "sequences of "
        return f"run {self.run}'s data ({path.name}, {n}{self.seq_len} tokens)"


@dataclass
class _Slice:
    ids: torch.Tensor  # [S, T] token ids, BOS at 0
    keep: torch.Tensor  # [S, T] bool: real tokens, BOS left out
    resid: torch.Tensor  # [S, T, d] the residual entering the layer
    data: str
    skipped: int
    name: str  # what the page says it read


_slices: weakref.WeakKeyDictionary[ModelAdapter, OrderedDict] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _recorded_sequences(folder: Path) -> int:
    stats = folder / "stats.json"
    if not stats.is_file():
        return 0
    return int(json.loads(stats.read_text()).get("sequences_seen", 0))


def layer_slice(adapter: ModelAdapter, d: Dictionary, n_tokens: int, source: TextSource) -> _Slice:
    """The residual entering ``d.layer`` on ``n_tokens`` tokens of ``source``, computed once."""
    key = (d.layer, n_tokens, source, str(d.path))
    with _lock:
        cache = _slices.setdefault(adapter, OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    data = source.data
    if data is None:
        from headscope.data.corpus import ensure_default_corpus

        data = ensure_default_corpus()
    seq_len = source.seq_len
    skip = 0 if source.run is not None else min(_recorded_sequences(d.path), MAX_SKIP)
    limit = None if source.sequences is None else skip + source.sequences
    seqs = iter_sequences(
        adapter.tokens, Path(data), seq_len, text_field=source.text_field, limit=limit
    )
    skipped = sum(1 for _ in zip(range(skip), seqs, strict=False))
    ids_l, keep_l, resid_l = [], [], []
    seen = 0
    # ~1k tokens per forward pass (8 sequences of 128; one of a long run's sequences)
    for batch in batched(seqs, max(1, min(8, 1024 // seq_len))):
        packed = stack(batch, adapter.tokens.bos_id)
        cap = adapter.run(
            packed.ids,
            layers=[],
            patterns=False,
            logits=False,
            resid_layers={d.layer},
            stop_after=d.layer - 1,
        )
        keep = packed.valid.clone()
        keep[:, 0] = False
        ids_l.append(torch.nn.functional.pad(packed.ids, (0, seq_len - packed.ids.shape[1])))
        keep_l.append(torch.nn.functional.pad(keep, (0, seq_len - keep.shape[1])))
        r = cap.resid_pre[d.layer].float().cpu()
        resid_l.append(torch.nn.functional.pad(r, (0, 0, 0, seq_len - r.shape[1])))
        seen += int(keep.sum())
        if seen >= n_tokens:
            break
    if not ids_l:
        raise InputError(f"{data} has no text left after {skipped} sequences")
    out = _Slice(
        torch.cat(ids_l),
        torch.cat(keep_l),
        torch.cat(resid_l),
        str(data),
        skipped,
        source.describe(Path(data)),
    )
    with _lock:
        cache = _slices.setdefault(adapter, OrderedDict())
        cache[key] = out
        while len(cache) > MAX_SLICES:
            cache.popitem(last=False)
    return out


def _activations(d: Dictionary, resid: torch.Tensor, feature: int) -> torch.Tensor:
    """``resid [N, d]`` -> the feature's activation ``[N]`` (chunked: a top-k SAE needs every
    pre-activation of a token to know whether this one is among its k largest)."""
    out = []
    with torch.no_grad():
        for chunk in resid.split(1024):
            out.append(d.sae.encode(chunk)[:, feature])
    return torch.cat(out)


def _context(
    adapter: ModelAdapter, ids: torch.Tensor, pos: int, width: int
) -> tuple[list[str], int]:
    lo, hi = max(1, pos - width), min(ids.shape[0], pos + width + 1)
    return [adapter.tokens.display(int(t)) for t in ids[lo:hi]], pos - lo


def _read_shares(
    adapter: ModelAdapter,
    d: Dictionary,
    layer: int,
    x: torch.Tensor,
    acts: torch.Tensor,
    feature: int,
) -> dict[str, torch.Tensor]:
    """Per head, the mean share of its query / key vector that the feature's row contributes at
    the tokens ``x [n, d]`` (activations ``acts [n]``): ``{"query": [H], "key": [H]}``."""
    s = adapter.spec
    f64 = torch.float64
    ln = adapter.ln_attn(layer)
    ln = type(ln)(ln.weight.to(f64), None if ln.bias is None else ln.bias.to(f64))
    x = x.to(f64)
    f = norm_factor(x, s.norm).to(f64)  # [n, 1]
    row = acts.to(f64)[:, None] * d.sae.W_dec[feature].detach().to(f64)  # [n, d]
    row_n = adapter.apply_norm_frozen(row, f, ln)
    x_n = adapter.apply_norm_frozen(x, f, ln)
    w = adapter.weights(layer)
    qk = adapter.qk_norm(layer)
    out = {}
    for side, W, b in (
        ("query", w.W_Q.to(f64), w.b_Q.to(f64)),
        ("key", w.W_K.to(f64)[w.kv_of_head], w.b_K.to(f64)[w.kv_of_head]),
    ):
        const = b + (ln.bias @ W if ln.bias is not None else 0.0)  # [H, D]
        part = torch.einsum("nd,hdk->nhk", row_n, W)
        full = torch.einsum("nd,hdk->nhk", x_n, W) + const
        if qk is not None:
            g = qk[0 if side == "query" else 1].to(f64)
            part, full = part * g, full * g
        out[side] = (part.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean(0)
    return out


def _writes(
    adapter: ModelAdapter,
    d: Dictionary,
    sl: _Slice,
    seqs: torch.Tensor,
    pos: torch.Tensor,
    feature: int,
) -> tuple[torch.Tensor, float] | None:
    """Every earlier head's mean direct effect on the feature's pre-activation at the tokens
    ``(seqs, pos)``: ``[layer, H]``, and the mean pre-activation there."""
    layer = d.layer
    if layer == 0:
        return None
    uniq, inv = torch.unique(seqs, return_inverse=True)
    ids = sl.ids[uniq]
    cap = adapter.run(
        ids, layers=list(range(layer)), patterns=False, logits=False, stop_after=layer - 1
    )
    e = d.sae.W_enc[:, feature].detach().float()  # [d]
    out = torch.zeros(layer, adapter.spec.n_heads, dtype=torch.float64)
    for lay in range(layer):
        z = cap.layers[lay].z[inv, pos].float()  # [n, H, D]
        w = adapter.weights(lay)
        per_head = torch.einsum("nhk,hkm,m->nh", z, w.W_O.float(), e)  # [n, H]
        out[lay] = per_head.double().mean(0)
    with torch.no_grad():
        pre = d.sae.pre_activations(sl.resid[seqs, pos]).float()[:, feature]
    return out, float(pre.mean())


def feature_page(
    adapter: ModelAdapter,
    dictionaries: DictionarySet,
    layer: int,
    feature: int,
    *,
    n_tokens: int = 8192,
    top: int = 12,
    context: int = 10,
    n_heads: int = 10,
    n_near: int = 8,
    data: Path | None = None,
    seq_len: int = SEQ_LEN,
    source: TextSource | None = None,
) -> FeaturePageResult:
    """Everything the app's feature page shows for feature ``feature`` of ``layer``'s residual
    dictionary (see the module docs). The text: ``source`` (a served run's data), else
    ``data`` (None: the default corpus) in sequences of ``seq_len`` tokens."""
    d = dictionaries.for_layer(layer)
    if not 0 <= feature < d.n_features:
        raise InputError(f"feature {feature} out of range 0..{d.n_features - 1}")
    if layer >= adapter.spec.n_layers:
        raise InputError(
            f"layer {layer}: feature pages cover layers 0..{adapter.spec.n_layers - 1}"
        )
    sl = layer_slice(adapter, d, n_tokens, source or TextSource(data, seq_len))
    S, T = sl.keep.shape
    flat_keep = sl.keep.flatten()
    resid = sl.resid.reshape(S * T, -1)
    acts = _activations(d, resid, feature) * flat_keep  # [S*T]
    n_seen = int(flat_keep.sum())
    fired = acts > 0
    n_fired = int(fired.sum())
    order = torch.argsort(acts, descending=True)[: max(READ_TOKENS, 4 * top)]
    order = order[acts[order] > 0]
    contexts, shown = [], set()
    for i in order.tolist():
        s, p = divmod(i, T)
        toks, at = _context(adapter, sl.ids[s], p, context)
        text = "".join(toks[:at]) + MARK_OPEN + toks[at] + MARK_CLOSE + "".join(toks[at + 1 :])
        if text in shown:
            continue
        shown.add(text)
        row = acts[s * T + max(1, p - context) : s * T + max(1, p - context) + len(toks)]
        contexts.append(
            {
                "tokens": toks,
                "acts": [round(float(a), 4) for a in row],
                "at": at,
                "activation": float(acts[i]),
                "sequence": s,
                "position": p,
            }
        )
        if len(contexts) == top:
            break
    vals = acts[fired]
    hi = float(vals.max()) if n_fired else 1.0
    counts = (
        torch.histc(vals.float(), bins=N_BINS, min=0.0, max=hi) if n_fired else torch.zeros(N_BINS)
    )
    edges = torch.linspace(0.0, hi, N_BINS + 1)

    readers: dict[str, list[dict]] = {"query": [], "key": []}
    writers: list[dict] = []
    near: list = []
    top_idx = order[:READ_TOKENS]
    if top_idx.numel():
        shares = _read_shares(adapter, d, layer, resid[top_idx], acts[top_idx], feature)
        for side in ("query", "key"):
            rank = torch.argsort(shares[side], descending=True)[:n_heads].tolist()
            readers[side] = [
                {"head": head_name(layer, h), "share": float(shares[side][h])} for h in rank
            ]
        w = _writes(adapter, d, sl, top_idx // T, top_idx % T, feature)
        if w is not None:
            per, pre = w
            flat = per.flatten()
            rank = torch.argsort(flat.abs(), descending=True)[:n_heads].tolist()
            H = adapter.spec.n_heads
            writers = [
                {
                    "head": head_name(i // H, i % H),
                    "value": float(flat[i]),
                    "share": float(flat[i] / pre) if pre else 0.0,
                }
                for i in rank
                if flat[i] != 0
            ]
        for side in ("query", "key"):
            head = readers[side][0]["head"]
            near.append(virtual_weights(adapter, dictionaries, head, feature, side, top=n_near))
    card = d.features.get(str(feature))
    return FeaturePageResult.model_validate(
        {
            "feature": d.label(feature),
            "layer": layer,
            "index": feature,
            "n_features": d.n_features,
            "label": feature_label(card),
            "card": card,
            "data": sl.data,
            "data_name": sl.name,
            "from_run": source is not None and source.run is not None,
            "skipped_sequences": sl.skipped,
            "n_tokens": n_seen,
            "density": n_fired / max(n_seen, 1),
            "mean_activation": float(vals.mean()) if n_fired else 0.0,
            "contexts": contexts,
            "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
            "query_readers": readers["query"],
            "key_readers": readers["key"],
            "writers": writers,
            "near": near,
        }
    )
