"""Hover cards for SAE features: top-activating contexts, activation density, promoted tokens.

:func:`label_features` streams a stretch of a dataset through the model once for every SAE it is
given (all sites captured in the same forward pass) and writes ``features.json`` beside each SAE::

    {"<feature index>": {
        "density": 0.0123,                      # fraction of tokens where the feature is > 0
        "top_contexts": ["… the cat⟦ sat⟧ on …"], # ±context tokens, the activating one in ⟦ ⟧
        "top_acts": [5.31],                     # the activation at each marked token
        "promoted": [" mat", " rug"]},          # tokens the decoder direction raises most
     ...}

This is what :meth:`headscope.dictionaries.basis.DictionarySet.cards` serves to the browser app.
Identical contexts (repeated text) are listed once. A card stays under :data:`MAX_CARD_BYTES`
(long tokens are clipped, then the last contexts are dropped). ``features_meta.json`` beside it
records how the cards were made.

Promoted tokens read a decoder direction through the final norm (its weight, and centring for
LayerNorm; the scale is left out: it does not change the ranking) and the unembedding. A residual
feature's direction is its decoder row. A z feature (per-head attention outputs before W_O) is
``Σ_h W_dec[f, h] @ W_O[h]``: what it adds to the residual stream. A value feature is read
through W_O of every query head that reads its key/value head (``Σ_h v_kv(h) @ W_O[h]``, per
layer), i.e. what it would add if every such head attended fully to its position. Post-attention
norms (Gemma) and logit softcapping are left out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from headscope.dictionaries.activations import capture_sites, site_key
from headscope.dictionaries.sae import CFG_FILENAME, SAE, load_sae
from headscope.files import write_json
from headscope.model import ModelAdapter
from headscope.precompute.sequences import batched, iter_sequences, stack

FEATURES_FILENAME = "features.json"
FEATURES_META_FILENAME = "features_meta.json"
MAX_CARD_BYTES = 1024
MAX_TOKEN_CHARS = 16  # a token longer than this is clipped in a context (runs of spaces, URLs)
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"
_PROMOTE_CHUNK = 256  # features per [chunk, vocab] logit block


@dataclass(frozen=True)
class LabelConfig:
    """How a ``features.json`` was made (written to ``features_meta.json``)."""

    model: str
    data: str
    n_tokens: int
    skip_sequences: int
    seq_len: int
    context: int
    top: int
    n_promoted: int
    tokens_seen: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sae_folders(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """SAE folders in ``paths``: each one an SAE folder (holds cfg.json) or a folder of them."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if (path / CFG_FILENAME).is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.iterdir() if (p / CFG_FILENAME).is_file())
        else:
            raise FileNotFoundError(f"no SAE folder {path}")
    if not out:
        raise FileNotFoundError(f"no SAE folders (cfg.json + sae_weights.safetensors) in {items}")
    return out


def sae_site(adapter: ModelAdapter, sae: SAE) -> tuple[str, tuple[int, ...]]:
    """(site, layers) to capture for an SAE, checked against the model's sizes.

    The stream captures the residual entering a layer, so a SAELens ``hook_resid_post`` SAE of
    layer L reads ``resid`` at L + 1; ``hook_resid_mid`` SAEs are not supported.
    """
    cfg = sae.cfg
    if cfg.site not in ("resid", "z", "v") or not cfg.layers:
        raise ValueError(f"SAE hook {cfg.hook_name!r}: only resid, z and v SAEs can be labelled")
    if cfg.site != "v" and len(cfg.layers) != 1:
        raise ValueError(f"a {cfg.site} SAE reads one layer, got {list(cfg.layers)}")
    layers = cfg.layers
    if cfg.site == "resid" and "hook_resid_mid" in cfg.hook_name:
        raise ValueError(f"SAE hook {cfg.hook_name!r}: resid_mid SAEs are not supported")
    if cfg.site == "resid" and cfg.hook_name.endswith("hook_resid_post"):
        layers = (layers[0] + 1,)
    s = adapter.spec
    bad = [layer for layer in layers if not 0 <= layer < s.n_layers]
    if bad:
        raise ValueError(
            f"SAE {cfg.hook_name!r} reads layer input(s) {bad}; the model has {s.n_layers} layers"
        )
    width = {
        "resid": s.d_model,
        "z": s.n_heads * s.d_head,
        "v": len(layers) * s.n_kv_heads * s.d_head,
    }[cfg.site]
    if cfg.d_in != width:
        raise ValueError(
            f"SAE {cfg.hook_name!r} has d_in={cfg.d_in}, but this model's {cfg.site} width is {width}"
        )
    return cfg.site, layers


def output_directions(adapter: ModelAdapter, sae: SAE) -> torch.Tensor:
    """Each feature's decoder direction as a residual-stream vector: ``[F, d_model]``."""
    site, layers = sae_site(adapter, sae)
    s = adapter.spec
    w_dec = sae.W_dec.detach().float().cpu()  # [F, d_in]
    F = w_dec.shape[0]
    if site == "resid":
        return w_dec
    if site == "z":
        w_o = adapter.weights(layers[0]).W_O.float().cpu()  # [H, D, d_model]
        return torch.einsum("fhd,hdm->fm", w_dec.view(F, s.n_heads, s.d_head), w_o)
    v = w_dec.view(F, len(layers), s.n_kv_heads, s.d_head)  # [F, n_layers, KV, D]
    out = torch.zeros(F, s.d_model)
    for i, layer in enumerate(layers):
        w = adapter.weights(layer)
        per_head = v[:, i, w.kv_of_head.cpu()]  # [F, H, D]: the value each query head reads
        out += torch.einsum("fhd,hdm->fm", per_head, w.W_O.float().cpu())
    return out


@torch.no_grad()
def promoted_tokens(adapter: ModelAdapter, directions: torch.Tensor, n: int = 8) -> torch.Tensor:
    """``directions [F, d_model]`` -> ids ``[F, n]`` of the tokens each raises most.

    Final norm's weight (with LayerNorm's centring) then the unembedding; no bias, so this is
    the direction's own effect on the logits.
    """
    norm = adapter.ln_final()
    w_u = adapter.unembed()[0].float().cpu()  # [d_model, V]
    x = directions.float()
    if adapter.spec.norm.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    x = x * norm.weight.float().cpu()  # [F, d_model]
    n = min(n, w_u.shape[1])
    return torch.cat(
        [(chunk @ w_u).topk(n, dim=-1).indices for chunk in x.split(_PROMOTE_CHUNK)]
    )  # [F, n]


class _TopK:
    """Running per-feature top ``top`` activations and where they happened (vectorised)."""

    def __init__(self, n_features: int, top: int):
        self.vals = torch.zeros(top, n_features)  # [top, F]
        self.locs = torch.full((top, n_features), -1, dtype=torch.long)  # [top, F] global token
        self.fired = torch.zeros(n_features, dtype=torch.long)  # [F] tokens with act > 0

    def update(self, acts: torch.Tensor, locs: torch.Tensor) -> None:
        """acts [N, F] (0 at masked positions), locs [N] global token index of each row."""
        self.fired += (acts > 0).sum(0)
        m = min(self.vals.shape[0], acts.shape[0])
        vals, idx = acts.topk(m, dim=0)  # [m, F]
        all_vals = torch.cat([self.vals, vals])  # [top + m, F]
        all_locs = torch.cat([self.locs, locs[idx]])
        best, pick = all_vals.topk(self.vals.shape[0], dim=0)  # [top, F]
        self.vals, self.locs = best, all_locs.gather(0, pick)


def _clip(token: str) -> str:
    return token if len(token) <= MAX_TOKEN_CHARS else token[: MAX_TOKEN_CHARS - 1] + "…"


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _fit(card: dict[str, Any]) -> dict[str, Any]:
    """Drop the last contexts until the card's JSON fits in MAX_CARD_BYTES."""
    while (
        len(json.dumps(card, ensure_ascii=False).encode()) > MAX_CARD_BYTES and card["top_contexts"]
    ):
        card["top_contexts"].pop()
        card["top_acts"].pop()
    return card


def label_features(
    adapter: ModelAdapter,
    folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    data: Path | None = None,
    *,
    n_tokens: int = 100_000,
    context: int = 8,
    top: int = 8,
    n_promoted: int = 8,
    skip_sequences: int | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    text_field: str = "text",
    log: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """Write ``features.json`` (+ ``features_meta.json``) beside each SAE in ``folders``.

    folders: SAE folders or folders of SAE folders (resid, z or v SAEs of ``adapter``'s model).
    data: dataset (default: the default corpus). The first ``skip_sequences`` packed sequences
        are skipped: by default the number a ``train_dictionaries`` run recorded in its
        ``stats.json`` (so labels come from text the SAE was not trained on), else 0.
    n_tokens: tokens (BOS left out) the top contexts and densities are measured on.
    context: tokens shown on each side of the activating token; top: contexts per feature.
    Returns ``{SAE folder: path of its features.json}``.
    """
    say = log or (lambda _msg: None)
    paths = sae_folders(folders)
    if data is None:
        from headscope.data.corpus import ensure_default_corpus

        data = ensure_default_corpus()
    data = Path(data)
    if skip_sequences is None:
        skip_sequences = max((_recorded_sequences(p) for p in paths), default=0)
    saes: list[tuple[Path, str, SAE]] = []
    sites: list[tuple[str, tuple[int, ...]]] = []
    for path in paths:
        sae = load_sae(path, device=adapter.device, dtype="float32").eval()
        site = sae_site(adapter, sae)
        saes.append((path, site_key(*site), sae))
        if site not in sites:
            sites.append(site)
    # Twice the candidates: repeated text (boilerplate) gives identical contexts, shown once.
    tops = [_TopK(sae.cfg.d_sae, 2 * top) for _, _, sae in saes]

    t0 = time.perf_counter()
    seqs = iter_sequences(adapter.tokens, data, seq_len, text_field=text_field)
    for skipped in range(skip_sequences):
        if next(seqs, None) is None:
            raise ValueError(
                f"{data} has only {skipped} sequences of {seq_len} tokens; "
                f"cannot skip {skip_sequences}"
            )
    id_rows: list[torch.Tensor] = []  # [B, seq_len] per batch, -1 = padding
    seen = 0
    for batch in batched(seqs, batch_size):
        packed = stack(batch, adapter.tokens.bos_id)
        ids, valid = packed.ids, packed.valid  # [B, T] each
        B, T = ids.shape
        keep = valid.clone()
        keep[:, 0] = False  # the BOS sink: an outlier every feature would otherwise "fire" on
        n_keep = int(keep.sum())
        if seen + n_keep > n_tokens:
            keep &= keep.flatten().cumsum(0).view(B, T) <= n_tokens - seen
            n_keep = n_tokens - seen
        padded = torch.full((B, seq_len), -1, dtype=torch.long)
        padded[:, :T] = ids.masked_fill(~valid, -1)
        base = len(id_rows) * batch_size * seq_len
        id_rows.append(padded)
        locs = (
            base + torch.arange(B)[:, None] * seq_len + torch.arange(T)[None, :]
        ).flatten()  # [B*T]
        acts = capture_sites(adapter, ids, sites)  # {key: [B, T, dim]}
        mask = keep.flatten().to(adapter.device)
        with torch.no_grad():
            for (_, key, sae), state in zip(saes, tops, strict=True):
                a = sae.encode(acts[key].reshape(B * T, -1).float())  # [B*T, F]
                state.update((a * mask[:, None]).cpu(), locs)
        seen += n_keep
        if seen >= n_tokens:
            break
    if seen == 0:
        raise ValueError(f"no tokens left in {data} after skipping {skip_sequences} sequences")
    # Batches are laid out batch_size rows apart; the last one may be short.
    ids_all = torch.full((len(id_rows) * batch_size, seq_len), -1, dtype=torch.long)
    for i, rows in enumerate(id_rows):
        ids_all[i * batch_size : i * batch_size + len(rows)] = rows
    say(f"labels: {seen:,} tokens in {time.perf_counter() - t0:.0f}s")

    cfg = LabelConfig(
        model=adapter.name,
        data=str(data),
        n_tokens=n_tokens,
        skip_sequences=skip_sequences,
        seq_len=seq_len,
        context=context,
        top=top,
        n_promoted=n_promoted,
        tokens_seen=seen,
    )
    written: dict[str, Path] = {}
    for (path, key, sae), state in zip(saes, tops, strict=True):
        promoted = promoted_tokens(adapter, output_directions(adapter, sae), n_promoted)
        cards = _cards(adapter, state, ids_all, seen, promoted, context, top)
        out = path / FEATURES_FILENAME
        write_json(out, cards)
        write_json(path / FEATURES_META_FILENAME, cfg.to_dict(), indent=2)
        alive = sum(1 for c in cards.values() if c["density"] > 0)
        say(f"labels: {key}: {alive}/{len(cards)} features fire -> {out}")
        written[str(path)] = out
    return written


def _cards(
    adapter: ModelAdapter,
    state: _TopK,
    ids_all: torch.Tensor,  # [S, L] token ids, -1 = none
    seen: int,
    promoted: torch.Tensor,  # [F, n] token ids
    context: int,
    top: int,
) -> dict[str, dict[str, Any]]:
    S, L = ids_all.shape
    offsets = torch.arange(-context, context + 1)  # [W]
    locs = state.locs.clamp_min(0)  # [top, F]
    seq, pos = locs // L, locs % L
    win = pos[..., None] + offsets  # [top, F, W]
    inside = (win >= 1) & (win < L)  # position 0 is the BOS
    win_ids = ids_all[seq[..., None].expand_as(win), win.clamp(0, L - 1)]  # [top, F, W]
    win_ids = win_ids.masked_fill(~inside, -1)
    has = (state.vals > 0) & (state.locs >= 0)  # [top, F]
    display = adapter.tokens.display
    density = (state.fired.double() / seen).tolist()
    vals, win_list, has_list = state.vals.tolist(), win_ids.tolist(), has.tolist()
    promoted_list = promoted.tolist()
    cards: dict[str, dict[str, Any]] = {}
    for f in range(state.vals.shape[1]):
        contexts, acts = [], []
        for j in range(state.vals.shape[0]):
            if not has_list[j][f]:
                break
            toks = [_clip(display(t)) if t >= 0 else "" for t in win_list[j][f]]
            toks[context] = MARK_OPEN + toks[context] + MARK_CLOSE
            text = "".join(toks)
            if text in contexts:
                continue
            contexts.append(text)
            acts.append(_round(vals[j][f]))
            if len(contexts) == top:
                break
        cards[str(f)] = _fit(
            {
                "density": _round(density[f]),
                "top_contexts": contexts,
                "top_acts": acts,
                "promoted": [_clip(display(t)) for t in promoted_list[f]],
            }
        )
    return cards


def marked_token(context: str) -> str:
    """The activating token of a ``top_contexts`` string (the text between ⟦ and ⟧)."""
    start = context.find(MARK_OPEN)
    end = context.rfind(MARK_CLOSE)
    return context[start + 1 : end] if 0 <= start < end else ""


def feature_label(card: dict[str, Any] | None, n: int = 3) -> str | None:
    """A short label for a feature from its card: the card's own ``label`` when it has one (a
    person's or a model's description), else the tokens it fires on most often in its top
    contexts, then the tokens its decoder promotes (``fires on “integer” “ C” · promotes “ Error”``).
    None without a card."""
    if not card:
        return None
    if card.get("label"):
        return str(card["label"])
    counts: dict[str, int] = {}
    for c in card.get("top_contexts") or []:
        tok = marked_token(c)
        if tok.strip():
            counts[tok] = counts.get(tok, 0) + 1
    fires = sorted(counts, key=lambda t: -counts[t])[:n]
    promoted = [t for t in card.get("promoted") or [] if t.strip()][:n]
    parts = []
    if fires:
        parts.append("fires on " + " ".join(f"“{t}”" for t in fires))
    if promoted:
        parts.append("promotes " + " ".join(f"“{t}”" for t in promoted))
    return " · ".join(parts) or None


def _recorded_sequences(path: Path) -> int:
    stats = path / "stats.json"
    if not stats.is_file():
        return 0
    return int(json.loads(stats.read_text()).get("sequences_seen", 0))


def load_cards(path: Path) -> dict[str, dict[str, Any]]:
    """``features.json`` of an SAE folder, or {} when it has none."""
    file = Path(path) / FEATURES_FILENAME
    return json.loads(file.read_text()) if file.is_file() else {}


def feature_densities(cards: dict[str, dict[str, Any]], n_features: int) -> torch.Tensor | None:
    """[F] densities from cards, or None when any feature has no card."""
    if not all(str(i) in cards for i in range(n_features)):
        return None
    return torch.tensor(
        [float(cards[str(i)]["density"]) for i in range(n_features)], dtype=torch.float64
    )
