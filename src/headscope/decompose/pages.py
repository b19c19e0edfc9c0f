"""Feature pages for the app: every decomposition saved in a run's ``decompose/`` folder, shown on
the run's own stored example sequences.

``headscope decompose pages RUN`` finds each decomposition folder under ``RUN/decompose/`` (any
depth up to two: ``RUN/decompose/mtc-L15/mtc/``, ``RUN/decompose/qk-L15H2/``, ...), captures its
layer on the example sequences the run stored for that layer's heads (one forward pass per layer,
up to the layer), and writes beside each folder's ``cfg.json``:

* ``pages.json``: MTC: per feature its head loadings, density, top source positions (encoder
  activation) and top destination positions (moved activation, with the source that sent most of
  it); QK: the feature report (:func:`qk_report`) on those sequences; split: for each of the
  head's stored examples, every position's sub-head shares and output norm, and which sub-head
  handles the example;

and ``RUN/decompose/index.json`` (:class:`DecomposeIndex`), listed in the run manifest under
``"decompose"`` so the app asks for it only when it exists. Context tokens are ids; the app
decodes them with the run's ``vocab.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from headscope.decompose.data import LayerData, capture_layer, contexts_from_rows
from headscope.decompose.io import (
    CFG_FILENAME,
    CLUSTERS_FILENAME,
    STATS_FILENAME,
    SWEEP_FILENAME,
)
from headscope.decompose.mtc import MTC, load_mtc
from headscope.decompose.qk import load_qk
from headscope.decompose.qk_report import qk_report
from headscope.decompose.results import LoadingClusterComparison, MTCSweep, QKReport, QKStats
from headscope.decompose.split import load_split
from headscope.decompose.split_train import head_target, shares
from headscope.errors import InputError, NotFound
from headscope.files import read_json, write_json
from headscope.model import ModelAdapter
from headscope.model.spec import head_name

INDEX = "decompose/index.json"
PAGES_FILENAME = "pages.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Context(_Model):
    sequence: int = Field(description="the run's sequence index")
    tokens: list[int] = Field(description="token ids (decode with the run's vocab.json)")


class Position(_Model):
    context: int = Field(description="index into the page's contexts")
    position: int
    value: float
    source: int | None = Field(None, description="destination only: the source that sent most")


class MTCFeaturePage(_Model):
    feature: int
    share: float = Field(description="share of all moved activation (destinations) on the pages")
    density: float = Field(description="fraction of source positions where it is active")
    loading: list[float] = Field(description="|head loading| per column, summing to 1")
    sources: list[Position] = Field(description="largest encoder activations")
    destinations: list[Position] = Field(description="largest moved (destination) activations")


class MTCPages(_Model):
    kind: str = "mtc"
    columns: list[str]
    contexts: list[Context]
    features: list[MTCFeaturePage]


class QKPages(_Model):
    kind: str = "qk"
    contexts: list[Context]
    report: QKReport


class SplitExamplePage(_Model):
    context: int = Field(description="index into the page's contexts")
    max_attention: float | None = Field(description="the run's max attention of the example")
    handled_by: int = Field(description="the sub-head with the largest share of output norm")
    output_share: list[float] = Field(description="each sub-head's share of the output norm")
    top: list[int] = Field(description="per position: the sub-head with the largest share")
    share: list[float] = Field(description="per position: that sub-head's share")
    norm: list[float] = Field(description="per position: the summed output's norm")


class SplitPages(_Model):
    kind: str = "split"
    head: str
    fve: float = Field(description="output FVE of the sub-heads' sum on these sequences")
    contexts: list[Context]
    examples: list[SplitExamplePage]


class IndexEntry(_Model):
    name: str = Field(description="the folder, relative to RUN/decompose")
    kind: str = Field(description="mtc | qk | split")
    layer: int
    heads: list[str] = Field(description="the heads it is about (MTC: the layer's heads)")
    variant: str | None = None
    config: dict[str, Any]
    stats: dict[str, Any] | None
    loads_on: dict[str, int] = Field(
        description="head -> features whose largest |loading| is that head (MTC), else 1"
    )
    pages: str | None = Field(description="pages.json relative to RUN/decompose, if written")


class SweepEntry(_Model):
    name: str = Field(description="the folder holding sweep.json, relative to RUN/decompose")
    sweep: MTCSweep


class ClusterEntry(_Model):
    name: str = Field(
        description="the folder holding value_clusters.json, relative to RUN/decompose"
    )
    comparison: LoadingClusterComparison


class DecomposeIndex(_Model):
    sequences: int = Field(description="the run's example sequences the pages are built on")
    entries: list[IndexEntry]
    sweeps: list[SweepEntry] = Field(
        default_factory=list, description="(L0, FVE) curves (decompose sweep)"
    )
    clusters: list[ClusterEntry] = Field(
        default_factory=list,
        description="head-loading cluster sizes of value SAEs and an MTC (decompose value-clusters)",
    )


# ----- finding folders -------------------------------------------------------------------------------
def find_folders(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every folder under ``root`` (depth <= 2) with a decomposition ``cfg.json``, sorted."""
    out = []
    for cfg_path in sorted([*root.glob(f"*/{CFG_FILENAME}"), *root.glob(f"*/*/{CFG_FILENAME}")]):
        cfg = read_json(cfg_path)
        if isinstance(cfg, dict) and cfg.get("kind") in ("mtc", "qk", "split"):
            out.append((cfg_path.parent, cfg))
    return out


def find_results(root: Path, filename: str) -> list[tuple[str, Any]]:
    """(folder relative to ``root``, parsed JSON) of every ``filename`` at depth <= 2, sorted."""
    paths = sorted([*root.glob(f"*/{filename}"), *root.glob(f"*/*/{filename}")])
    return [(p.parent.relative_to(root).as_posix(), read_json(p)) for p in paths]


def _layer_data(
    adapter: ModelAdapter, run: Path, layer: int, heads: list[str] | None = None
) -> tuple[LayerData, list[dict]]:
    """The layer captured on the run's example sequences of the layer's heads (only those in
    ``heads`` when it names any of them; deduplicated, one length), with the examples'
    ``(sequence, tokens)`` in the order captured."""
    seen: dict[int, dict] = {}
    names = [head_name(layer, h) for h in range(adapter.spec.n_heads)]
    if heads and any(n in heads for n in names):
        names = [n for n in names if n in heads]
    for name in names:
        path = run / "heads" / f"{name}.json"
        if path.is_file():
            for ex in read_json(path).get("examples") or []:
                seen.setdefault(int(ex["sequence"]), ex)
    if not seen:
        raise NotFound(f"the run stores no example sequences for layer {layer}")
    rows = [torch.tensor(seen[s]["tokens"]) for s in sorted(seen)]
    n_ctx = max(int(r.shape[0]) for r in rows)
    kept = [seen[s] for s in sorted(seen) if len(seen[s]["tokens"]) == n_ctx]
    ids = contexts_from_rows(rows, n_ctx)
    return capture_layer(adapter, ids, layer), kept


def _contexts(examples: list[dict]) -> list[Context]:
    return [Context(sequence=int(e["sequence"]), tokens=list(e["tokens"])) for e in examples]


# ----- one page per kind --------------------------------------------------------------------------------
@torch.no_grad()
def mtc_pages(
    mtc: MTC, data: LayerData, contexts: list[Context], *, n_features: int = 32, n: int = 6
) -> MTCPages:
    """The ``n_features`` features of ``mtc`` that move the most activation on ``data``."""
    cfg = mtc.cfg
    H, F, T = cfg.n_heads, cfg.n_features, data.n_ctx
    acts = mtc.encode(data.resid)  # [N, T, F]
    N = acts.shape[0]
    k = min(cfg.k_moved, F)
    moved_mask = torch.zeros(N, F, dtype=torch.bool)
    moved_mask.scatter_(1, acts.sum(1).topk(k, dim=-1).indices, True)  # [N, F]
    w = mtc.loadings()  # [F, H + 1]
    pattern = data.pattern.float()  # [N, H, T, T]
    m = torch.einsum("nhts,nsf,fh->ntf", pattern, acts, w[:, :H]) + acts * w[:, H]
    m = m * moved_mask[:, None, :]  # [N, T, F]: only each context's top-k features move
    m[:, 0] = 0.0  # position 0 is a source only
    mass = m.abs().sum((0, 1)).double()  # [F]
    share = mass / mass.sum().clamp_min(1e-30)
    active = (acts[:, 1:] > 0).float().mean((0, 1))  # [F]
    loads = mtc.head_loadings()  # [F, H + 1]
    pages = []
    for f in share.topk(min(n_features, F)).indices.tolist():
        if share[f] <= 0:
            break
        src = acts[..., f].flatten().topk(min(n, N * T))
        dst = m[..., f].flatten().topk(min(n, N * T))
        sources = [
            Position(context=i // T, position=i % T, value=float(v), source=None)
            for v, i in zip(src.values.tolist(), src.indices.tolist(), strict=True)
            if v > 0
        ]
        destinations = []
        for v, i in zip(dst.values.tolist(), dst.indices.tolist(), strict=True):
            if v <= 0:
                break
            c, t = divmod(i, T)
            per_source = torch.einsum("hs,h->s", pattern[c, :, t], w[f, :H]) * acts[c, :, f]
            per_source[t] += w[f, H] * acts[c, t, f]  # [T]: what each source sent to t
            source = int(per_source[: t + 1].argmax())
            destinations.append(Position(context=c, position=t, value=float(v), source=source))
        pages.append(
            MTCFeaturePage(
                feature=f,
                share=float(share[f]),
                density=float(active[f]),
                loading=[round(float(x), 4) for x in loads[f]],
                sources=sources,
                destinations=destinations,
            )
        )
    columns = [head_name(cfg.layer, h) for h in range(H)] + ["identity"]
    return MTCPages(columns=columns, contexts=contexts, features=pages)


@torch.no_grad()
def split_pages(
    adapter: ModelAdapter, split, data: LayerData, contexts: list[Context], examples: list[dict]
) -> SplitPages:
    """Which sub-head handles each of the split head's stored examples, position by position."""
    cfg = split.cfg
    share = shares(split, data)  # [N, T, k]
    outs = torch.cat([split(b.resid, data.rope) for b in data.batches(8)])  # [N, k, T, d]
    norms = outs.norm(dim=-1).transpose(1, 2)  # [N, T, k]
    total = outs.sum(1)  # [N, T, d]
    target = head_target(adapter, data, cfg.heads)  # [N, T, d]
    err = (total[:, 1:] - target[:, 1:]).pow(2).sum()
    var = (target[:, 1:] - target[:, 1:].mean((0, 1))).pow(2).sum()
    fve = float(1 - err / var.clamp_min(1e-30))
    wanted = {int(e["sequence"]): e for e in examples}
    pages = []
    for c, ctx in enumerate(contexts):
        if ctx.sequence not in wanted:
            continue
        by_norm = norms[c, 1:].sum(0)  # [k]
        out_share = by_norm / by_norm.sum().clamp_min(1e-30)
        top = share[c].argmax(-1)  # [T]
        ma = wanted[ctx.sequence].get("max_attention")
        pages.append(
            SplitExamplePage(
                context=c,
                max_attention=float(ma) if ma is not None else None,
                handled_by=int(out_share.argmax()),
                output_share=[round(float(x), 4) for x in out_share],
                top=top.tolist(),
                share=[round(float(x), 3) for x in share[c].gather(-1, top[:, None])[:, 0]],
                norm=[round(float(x), 3) for x in total[c].norm(dim=-1)],
            )
        )
    return SplitPages(
        head=head_name(cfg.layer, cfg.heads[0]), fve=fve, contexts=contexts, examples=pages
    )


# ----- the command ------------------------------------------------------------------------------------------
def _entry(root: Path, folder: Path, cfg: dict[str, Any], pages: bool) -> IndexEntry:
    kind, layer = cfg["kind"], int(cfg["layer"])
    stats_path = folder / STATS_FILENAME
    stats = read_json(stats_path) if stats_path.is_file() else None
    if kind == "mtc":
        heads = [head_name(layer, h) for h in range(int(cfg["n_heads"]))]
        mtc = load_mtc(folder)
        loads = mtc.head_loadings()  # [F, H + 1]
        alive = mtc.W_enc.norm(dim=0) > 0
        dom = torch.bincount(loads[alive].argmax(-1), minlength=len(heads) + 1)
        loads_on = {h: int(dom[i]) for i, h in enumerate(heads) if int(dom[i])}
    elif kind == "qk":
        heads = [head_name(layer, int(cfg["head"]))]
        loads_on = {heads[0]: 1}
    else:
        heads = [head_name(layer, int(h)) for h in cfg["heads"]]
        loads_on = dict.fromkeys(heads, 1)
    rel = folder.relative_to(root).as_posix()
    return IndexEntry(
        name=rel,
        kind=kind,
        layer=layer,
        heads=heads,
        variant=cfg.get("variant"),
        config=cfg,
        stats=stats,
        loads_on=loads_on,
        pages=f"{rel}/{PAGES_FILENAME}" if pages else None,
    )


def write_pages(
    adapter: ModelAdapter,
    run: str | Path,
    *,
    heads: list[str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> DecomposeIndex:
    """Write ``pages.json`` for every decomposition under ``RUN/decompose/`` and the index;
    list the index in the run manifest. ``heads``: show each layer on the example sequences of
    these heads only (fewer sequences, a cheaper capture); default: all the layer's heads."""
    run = Path(run)
    root = run / "decompose"
    folders = find_folders(root) if root.is_dir() else []
    sweeps = [
        SweepEntry(name=name, sweep=MTCSweep.model_validate(d))
        for name, d in (find_results(root, SWEEP_FILENAME) if root.is_dir() else [])
    ]
    clusters = [
        ClusterEntry(name=name, comparison=LoadingClusterComparison.model_validate(d))
        for name, d in (find_results(root, CLUSTERS_FILENAME) if root.is_dir() else [])
    ]
    if not folders and not sweeps and not clusters:
        raise NotFound(
            f"{root} holds no decomposition folder (a cfg.json of kind mtc, qk, split), "
            f"{SWEEP_FILENAME} or {CLUSTERS_FILENAME}"
        )
    by_layer: dict[int, list[tuple[Path, dict[str, Any]]]] = {}
    for folder, cfg in folders:
        by_layer.setdefault(int(cfg["layer"]), []).append((folder, cfg))
    entries, n_seq = [], 0
    for layer, items in sorted(by_layer.items()):
        if not 0 <= layer < adapter.spec.n_layers:
            raise InputError(
                f"{items[0][0]} is for layer {layer}; the model has {adapter.spec.n_layers}"
            )
        log(f"layer {layer}: capturing the run's example sequences")
        data, examples = _layer_data(adapter, run, layer, heads)
        contexts = _contexts(examples)
        n_seq = max(n_seq, len(contexts))
        for folder, cfg in items:
            log(f"  {folder.relative_to(root)} ({cfg['kind']})")
            page: BaseModel
            if cfg["kind"] == "mtc":
                page = mtc_pages(load_mtc(folder), data, contexts)
            elif cfg["kind"] == "qk":
                stats_path = folder / STATS_FILENAME
                if not stats_path.is_file():
                    raise NotFound(f"{folder} has no {STATS_FILENAME} (the QK model's stats)")
                report = qk_report(
                    load_qk(folder),
                    data,
                    QKStats.model_validate(read_json(stats_path)),
                    tokens=adapter.tokens,
                    n_features=32,
                )
                page = QKPages(contexts=contexts, report=report)
            else:
                split = load_split(folder)
                own = run / "heads" / f"{head_name(layer, split.cfg.heads[0])}.json"
                exs = read_json(own).get("examples") or [] if own.is_file() else []
                page = split_pages(adapter, split, data, contexts, exs)
            write_json(folder / PAGES_FILENAME, page.model_dump())
            entries.append(_entry(root, folder, cfg, pages=True))
    index = DecomposeIndex(sequences=n_seq, entries=entries, sweeps=sweeps, clusters=clusters)
    write_json(run / INDEX, index.model_dump(), indent=1)
    manifest = read_json(run / "manifest.json")
    if manifest.get("decompose") != INDEX:
        manifest["decompose"] = INDEX
        write_json(run / "manifest.json", manifest, indent=2)
    return index


def format_index(index: DecomposeIndex) -> str:
    """One line per decomposition: kind, folder, heads and its headline metric."""
    lines = [f"feature pages on {index.sequences} example sequences of the run"]
    for e in index.entries:
        s = e.stats or {}
        metric = (
            f"FVE {s['fve']:.3f}, L0 {s['l0']:.1f}"
            if e.kind == "mtc" and "fve" in s and "l0" in s
            else f"KL {s['kl']:.3f}, top-1 {s['top1']:.3f}"
            if e.kind == "qk" and "kl" in s
            else f"FVE {s['fve']:.4f}"
            if "fve" in s
            else ""
        )
        lines.append(f"{e.kind:5s} {e.name}: {', '.join(e.heads[:3])}  {metric}")
    for sw in index.sweeps:
        variants = sorted({r.variant for r in sw.sweep.rows})
        lines.append(
            f"sweep {sw.name}: layer {sw.sweep.layer}, {len(sw.sweep.values)} L1 values x "
            f"{', '.join(variants)}"
        )
    for cl in index.clusters:
        lines.append(
            f"clusters {cl.name}: layer {cl.comparison.layer}, "
            f"{len(cl.comparison.sets)} sets of head loadings"
        )
    return "\n".join(lines)
