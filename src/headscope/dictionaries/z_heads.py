"""Heads read through z dictionaries ("We Inspected Every Head in GPT-2 Small Using SAEs").

A z-SAE reconstructs the concatenated per-head outputs of one layer, so each feature's decoder
row splits into one slice per head. Per head, :func:`z_heads` lists its top 10 features by
decoder-norm share (:func:`~headscope.dictionaries.reports.z_head_report`), classes it as mono-,
mostly mono-, bi- or polysemantic from how those features group
(:func:`~headscope.dictionaries.reports.semantic_class`), and measures on text how much of the
head's output its features explain:

- ``explained``: 1 - Var(z_h - ẑ_h) / Var(z_h) (variances summed over the head's D dimensions)
  with ẑ_h = b_dec[h] + Σ_f a_f W_dec[f, h], every feature's direct contribution to the head's
  output (its activation times its decoder slice for the head); the SAE's own explained
  variance restricted to one head, a constant offset of the residual not counted against it;
- ``top_explained``: the same with only the head's top 10 features (the others' mean
  contribution is then such an offset);
- per top feature, ``dfa_share``: the head's direct feature attribution, the part of the
  feature's pre-activation (less b_enc) that comes from this head's slice of z, summed over
  the tokens where the feature fires, over the same sum for every head.

:func:`add_to_run` writes ``zsae_*`` metric columns (the app's scatter and head pages) and a
``zsae`` panel into each head's file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from headscope.dictionaries.activations import iter_activations
from headscope.dictionaries.reports import (
    EXCEPTIONS_PER_TEN,
    LINK_COSINE,
    SEMANTIC_CLASSES,
    z_head_report,
)
from headscope.dictionaries.sae import SAE, load_sae
from headscope.errors import InputError
from headscope.model import ModelAdapter

PANEL = "zsae"  # the key of the head files' panel
CLASS_COLUMN = "zsae_class"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZFeature(_Model):
    feature: int = Field(description="index in the layer's z dictionary")
    share: float = Field(description="the head's decoder-norm share of the feature (0..1)")
    density: float | None = Field(description="fraction of labelling tokens where it fires")
    dfa_share: float | None = Field(
        description="the head's part of the feature's pre-activation where it fires (direct "
        "feature attribution); null: not measured"
    )
    context: str | None = Field(description="its top activating context, the token in ⟦ ⟧")
    promoted: list[str] = Field(description="tokens its decoder direction raises most")
    group: int = Field(description="its group among the head's top features (related features)")


class ZHead(_Model):
    head: str
    semantic_class: str | None = Field(description="one of classes; null: no feature")
    class_index: int | None = Field(description="1 monosemantic ... 4 polysemantic")
    group_sizes: list[int] = Field(description="sizes of the groups of its top features")
    top_feature_share: float | None = Field(description="its largest decoder-norm share")
    explained: float | None = Field(
        description="fraction of the head's output variance explained by all features"
    )
    top_explained: float | None = Field(
        description="the same by its top features alone (and the decoder bias)"
    )
    top_features: list[ZFeature] = Field(description="its top 10 by decoder-norm share")


class ZHeadsResult(_Model):
    saes: list[str] = Field(description="the z dictionary folders read")
    layers: list[int]
    data: str | None = Field(description="the text the explained fractions were measured on")
    n_tokens: int = Field(description="tokens measured (0: not measured)")
    classes: list[str] = Field(description="class names, class_index 1..4")
    tally: dict[str, int] = Field(description="heads per class")
    link_cosine: float = Field(
        description="features are related when their decoder slices for the head have at "
        "least this cosine (or share a token)"
    )
    exceptions_per_ten: int = Field(description="exceptions a mostly monosemantic head may have")
    heads: list[ZHead]


def z_folders(path: str | Path) -> list[Path]:
    """The one-layer z dictionaries at ``path``: the folder itself, or its ``z_L*`` folders."""
    path = Path(path)

    def is_z(folder: Path) -> bool:
        cfg = folder / "cfg.json"
        if not cfg.is_file():
            return False
        d = json.loads(cfg.read_text())
        return str(d.get("hook_name", "")).endswith("attn.hook_z")

    if not path.is_dir():
        raise InputError(f"{path} is not a folder")
    found = [path] if is_z(path) else sorted(p for p in path.iterdir() if is_z(p))
    if not found:
        raise InputError(f"{path} holds no z dictionary (train one with train-sae --site z)")
    return found


class _Measure:
    """Streamed sums for one z dictionary: per head, its output's variance and the residuals
    of its reconstruction by all features and by its top features; per (head, top feature),
    the feature's pre-activation from this head and from all heads where it fires."""

    def __init__(self, sae: SAE, key: str, top: list[list[int]], n_heads: int, d_head: int):
        self.sae, self.key, self.H, self.D = sae, key, n_heads, d_head
        T = max(1, max(len(t) for t in top))
        self.idx = torch.tensor([t + [0] * (T - len(t)) for t in top])  # [H, T]
        self.valid = torch.tensor([[i < len(t) for i in range(T)] for t in top])  # [H, T]
        f64 = torch.float64
        self.n = 0
        self.sum = torch.zeros(n_heads, d_head, dtype=f64)
        self.sumsq = torch.zeros(n_heads, dtype=f64)
        self.sse = torch.zeros(n_heads, dtype=f64)
        self.sse_top = torch.zeros(n_heads, dtype=f64)
        self.res = torch.zeros(n_heads, d_head, dtype=f64)  # Σ of the residuals (their mean
        self.res_top = torch.zeros(n_heads, d_head, dtype=f64)  # is an offset, not variance)
        self.dfa_head = torch.zeros(n_heads, T, dtype=f64)
        self.dfa_all = torch.zeros(n_heads, T, dtype=f64)

    @torch.no_grad()
    def update(self, rows: dict[str, torch.Tensor]) -> None:
        sae, H, D = self.sae, self.H, self.D
        z = rows[self.key].to(sae.W_enc.dtype)  # [N, H·D]
        N, F = z.shape[0], sae.cfg.d_sae
        scale = sae.cfg.scale or 1.0
        a = sae.encode(z)  # [N, F]
        zh = z.double().view(N, H, D)
        W = sae.W_dec.detach().view(F, H, D)  # [F, H, D]
        bias = (sae.b_dec.detach() / scale).double().view(H, D)
        recon = sae.decode(a).double().view(N, H, D)
        heads = torch.arange(H)[:, None]
        a_top = a[:, self.idx] * self.valid  # [N, H, T]
        w_top = W[self.idx, heads]  # [H, T, D]
        recon_top = torch.einsum("nht,htd->nhd", a_top, w_top).double() / scale + bias
        self.n += N
        self.sum += zh.sum(0)
        self.sumsq += (zh**2).sum((0, 2))
        self.sse += ((zh - recon) ** 2).sum((0, 2))
        self.sse_top += ((zh - recon_top) ** 2).sum((0, 2))
        self.res += (zh - recon).sum(0)
        self.res_top += (zh - recon_top).sum(0)
        x = sae.scale_input(z)
        if sae.cfg.apply_b_dec_to_input:
            x = x - sae.b_dec.detach()
        w_enc = sae.W_enc.detach().view(H, D, F).transpose(1, 2)[heads, self.idx]  # [H, T, D]
        part = torch.einsum("nhd,htd->nht", x.view(N, H, D), w_enc).double()
        full = (x @ sae.W_enc.detach())[:, self.idx].double()  # [N, H, T]
        fires = a_top > 0
        self.dfa_head += (part * fires).sum(0)
        self.dfa_all += (full * fires).sum(0)

    def explained(self) -> tuple[list[float | None], list[float | None]]:
        """1 - Var(z_h - ẑ_h) / Var(z_h) per head, by all features and by the top ones."""
        n = max(self.n, 1)
        var = self.sumsq - (self.sum**2).sum(1) / n

        def fve(sse: torch.Tensor, res: torch.Tensor) -> list[float | None]:
            res_var = sse - (res**2).sum(1) / n
            return [float(1 - r / v) if v > 0 else None for r, v in zip(res_var, var, strict=True)]

        return fve(self.sse, self.res), fve(self.sse_top, self.res_top)

    def dfa(self) -> list[list[float | None]]:
        return [
            [float(p / q) if q > 0 else None for p, q, ok in zip(ph, qh, vh, strict=True) if ok]
            for ph, qh, vh in zip(self.dfa_head, self.dfa_all, self.valid, strict=True)
        ]


def z_heads(
    folders: Sequence[str | Path],
    adapter: ModelAdapter | None = None,
    *,
    data: str | Path | None = None,
    n_tokens: int = 16_384,
    seq_len: int = 256,
    text_field: str = "text",
    skip_sequences: int | None = None,
    batch_size: int = 8,
    top: int = 10,
) -> ZHeadsResult:
    """Every head of the z dictionaries' layers: top features, class, explained fractions.

    Each folder's ``head_report.json`` is written again (:func:`z_head_report`). With an
    ``adapter`` and ``n_tokens > 0`` the explained fractions and DFA shares are measured on
    ``n_tokens`` tokens of ``data`` (None: the default corpus) in packed sequences of
    ``seq_len``, after ``skip_sequences`` sequences (None: those the first dictionary trained
    on, as labelling does); else they are null.
    """
    paths = [Path(f) for f in folders]
    reports = [z_head_report(p, top=top) for p in paths]
    keys = [f"z_L{r['layer']}" for r in reports]
    if len(set(keys)) != len(keys):
        raise InputError(f"two z dictionaries for one layer: {', '.join(keys)}")
    measured: dict[str, _Measure] = {}
    source = None
    if adapter is not None and n_tokens > 0:
        if data is None:
            from headscope.data.corpus import ensure_default_corpus

            data = ensure_default_corpus()
        if skip_sequences is None:
            stats = paths[0] / "stats.json"
            skip_sequences = (
                int(json.loads(stats.read_text()).get("sequences_seen", 0))
                if stats.is_file()
                else 0
            )
        for path, rep, key in zip(paths, reports, keys, strict=True):
            sae = load_sae(path, dtype="float32", device=adapter.device)
            tops = [[int(t["feature"]) for t in h["top_by_share"]] for h in rep["heads"]]
            measured[key] = _Measure(sae, key, tops, rep["n_heads"], rep["d_head"])
        stream = iter_activations(
            adapter,
            Path(data),
            [("z", (int(r["layer"]),)) for r in reports],
            n_tokens=n_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            text_field=text_field,
            skip_sequences=skip_sequences,
        )
        for rows in stream:
            for acc in measured.values():
                acc.update({acc.key: rows[acc.key].cpu()})
        source = str(data)
    heads: list[ZHead] = []
    for rep, key in zip(reports, keys, strict=True):
        m = measured.get(key)
        none: list[float | None] = [None] * rep["n_heads"]
        fve, fve_top = m.explained() if m is not None else (none, none)
        dfa = m.dfa() if m is not None else [[None] * top for _ in rep["heads"]]
        for h, row in enumerate(rep["heads"]):
            feats = row["top_by_share"]
            heads.append(
                ZHead(
                    head=row["head"],
                    semantic_class=row["class"],
                    class_index=row["class_index"],
                    group_sizes=row["group_sizes"],
                    top_feature_share=feats[0]["share"] if feats else None,
                    explained=fve[h],
                    top_explained=fve_top[h],
                    top_features=[
                        ZFeature(
                            feature=t["feature"],
                            share=t["share"],
                            density=t.get("density"),
                            dfa_share=dfa[h][i],
                            context=t.get("context"),
                            promoted=list(t.get("promoted", [])),
                            group=t["group"],
                        )
                        for i, t in enumerate(feats)
                    ],
                )
            )
    return ZHeadsResult(
        saes=[str(p) for p in paths],
        layers=[int(r["layer"]) for r in reports],
        data=source,
        n_tokens=next(iter(measured.values())).n if measured else 0,
        classes=list(SEMANTIC_CLASSES),
        tally={c: sum(h.semantic_class == c for h in heads) for c in SEMANTIC_CLASSES},
        link_cosine=LINK_COSINE,
        exceptions_per_ten=EXCEPTIONS_PER_TEN,
        heads=heads,
    )


def tally_line(result: ZHeadsResult) -> str:
    """'12 heads: 1 monosemantic, 0 mostly monosemantic, 2 bisemantic, 9 polysemantic'."""
    n = sum(result.tally.values())
    return f"{n} heads: " + ", ".join(f"{v} {k}" for k, v in result.tally.items())


def format_text(result: ZHeadsResult) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"z dictionaries of layers {', '.join(map(str, result.layers))}; explained fractions "
        + (
            f"on {result.n_tokens:,} tokens of {result.data}" if result.n_tokens else "not measured"
        ),
        f"{'head':<8} {'class':<20} {'groups':<18} {'top share':>9} {'explained':>9} "
        f"{'top 10':>8}  top feature",
    ]
    for h in result.heads:
        first = h.top_features[0] if h.top_features else None
        what = "" if first is None else f"#{first.feature} {first.context or ''}"
        what = what.replace("\n", "↵").replace("\t", "⇥")
        lines.append(
            f"{h.head:<8} {h.semantic_class or '-':<20} "
            f"{'+'.join(map(str, h.group_sizes)) or '-':<18} "
            f"{'-' if h.top_feature_share is None else f'{h.top_feature_share:.2f}':>9} "
            f"{pct(h.explained):>9} {pct(h.top_explained):>8}  {what[:60]!s}"
        )
    lines.append(tally_line(result))
    return "\n".join(lines)


def class_doc(result: ZHeadsResult) -> str:
    return (
        'The head\'s class after "We Inspected Every Head in GPT-2 Small Using SAEs": 1 '
        "monosemantic (its top 10 z-dictionary features by decoder-norm share all related), 2 "
        f"mostly monosemantic (all but one or two), 3 bisemantic (two groups), 4 polysemantic. "
        "Related: a shared activating or promoted token, or decoder slices with cosine >= "
        f"{result.link_cosine}. Model-wide: {tally_line(result)}."
    )


def add_to_run(run_dir: str | Path, result: ZHeadsResult) -> list[str]:
    """Write the result into a run: metric columns ``zsae_class`` (1..4, named levels),
    ``zsae_top_feature_share``, ``zsae_explained`` and ``zsae_top10_explained`` and each head's
    ``zsae`` panel. Heads of layers without a z dictionary get nulls. Returns the columns."""
    from headscope.store.columns import add_head_columns, add_head_panels

    measured = (
        f" Measured on {result.n_tokens:,} tokens of {Path(result.data).name}."
        if result.data
        else ""
    )

    def col(get: Any) -> dict[str, float]:
        return {h.head: float(v) for h in result.heads if (v := get(h)) is not None}

    values = {
        CLASS_COLUMN: col(lambda h: h.class_index),
        "zsae_top_feature_share": col(lambda h: h.top_feature_share),
        "zsae_explained": col(lambda h: h.explained),
        "zsae_top10_explained": col(lambda h: h.top_explained),
    }
    docs = {
        CLASS_COLUMN: class_doc(result),
        "zsae_top_feature_share": "The largest decoder-norm share of any z-dictionary feature "
        "in this head: the norm of the head's slice of the feature's decoder row over the sum "
        "over heads (1: the head writes the feature alone).",
        "zsae_explained": "Fraction of the head's output variance that its z dictionary's "
        "features explain: 1 - Var(output - each feature's activation times its decoder slice "
        "for the head, summed) / Var(output)." + measured,
        "zsae_top10_explained": "The same as zsae explained with only the head's top 10 "
        "features by decoder-norm share (often rare features, so a small fraction)." + measured,
    }
    levels = {CLASS_COLUMN: {str(i + 1): c for i, c in enumerate(result.classes)}}
    cols = add_head_columns(run_dir, values, docs, levels=levels)
    context = result.model_dump(exclude={"heads"})
    add_head_panels(run_dir, PANEL, {h.head: {**context, **h.model_dump()} for h in result.heads})
    return cols


def measure_settings(run_dir: str | Path) -> dict[str, Any]:
    """``z_heads`` keywords that measure on a run's own data: its dataset, text field and
    sequence length, at most its tokens, no sequence skipped."""
    from headscope.precompute.config import PrecomputeConfig
    from headscope.store import open_run

    run = open_run(run_dir)
    cfg = PrecomputeConfig.from_dict(run.manifest["config"])
    data = (run.manifest.get("dataset") or {}).get("path") or cfg.data
    tokens = (run.manifest.get("tokens") or {}).get("sequences") or cfg.n_sequences
    return {
        "data": data,
        "seq_len": cfg.seq_len,
        "text_field": cfg.text_field,
        "skip_sequences": 0,
        "max_tokens": int(tokens) * (cfg.seq_len - 1),
        "model": cfg.model,
    }


__all__ = [
    "ZFeature",
    "ZHead",
    "ZHeadsResult",
    "add_to_run",
    "format_text",
    "measure_settings",
    "tally_line",
    "z_folders",
    "z_heads",
]
