"""Heads of several models in one motif space ("Motifs in Attention Patterns of Large Language
Models"): one embedder fitted on the pattern features of several runs, and distances between
heads of different models.

Each run keeps the raw motif features of its patterns (``motifs/features.npy``, float32
``[n_heads, n_sequences, F]``, :data:`~headscope.precompute.motifs.MOTIF_FEATURE_NAMES`). A
*space* is a :class:`~headscope.precompute.motifs.MotifEmbedder` fitted on the features of
several runs (each run weighted equally), saved as one safetensors file and reusable.

**Distance between heads of two models.** Within one run the paper's distance applies: the mean
over prompts of the distance between the two heads' embeddings on the same prompt. Two models
do not see the same prompts (their tokenizers split and pack the same text differently), so
across runs headscope compares the two heads' *distributions* of pattern embeddings, with the
energy distance ``2 E|a - b| - E|a - a'| - E|b - b'|`` (0 exactly when the distributions are
equal) — the distribution-level alternative the paper's discussion proposes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from headscope.errors import DataError, InputError
from headscope.model.spec import head_name, parse_head
from headscope.precompute.motifs import MOTIF_FEATURE_NAMES, MotifEmbedder, head_map
from headscope.store.run import Run, open_run

FEATURES_FILE = "motifs/features.npy"


def run_features(run: Run) -> tuple[list[str], Tensor]:
    """A run's head names and raw motif features ``[n_heads, n_sequences, F]``."""
    path = run.path / FEATURES_FILE
    if not path.is_file():
        raise DataError(
            f"{run.path} has no {FEATURES_FILE} (runs made before this headscope version): "
            "re-run its precompute command to add it"
        )
    feats = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    if feats.ndim != 3 or feats.shape[-1] != len(MOTIF_FEATURE_NAMES):
        raise DataError(f"{path} has shape {tuple(feats.shape)}, not [heads, sequences, features]")
    layers = run.manifest.get("layers") or range(run.manifest["model"]["n_layers"])
    names = [
        head_name(layer, h) for layer in layers for h in range(run.manifest["model"]["n_heads"])
    ]
    if len(names) != feats.shape[0]:
        raise DataError(f"{path} has {feats.shape[0]} heads; the run has {len(names)}")
    return names, feats


def fit_space(runs: list[str | Path], out: str | Path) -> Path:
    """Fit one motif embedder on the pattern features of ``runs`` (each run weighted equally:
    the same number of (head, sequence) rows drawn from each) and save it to ``out``."""
    if not runs:
        raise InputError("name at least one run")
    rows = [run_features(open_run(r))[1].reshape(-1, len(MOTIF_FEATURE_NAMES)) for r in runs]
    n = min(len(x) for x in rows)
    g = torch.Generator().manual_seed(0)
    sample = [x[torch.randperm(len(x), generator=g)[:n]] for x in rows]
    out = Path(out)
    MotifEmbedder.fit(torch.cat(sample)).save(out)
    return out


def _space(runs: list[Run], space: str | Path | None) -> MotifEmbedder:
    if space is not None:
        try:
            return MotifEmbedder.load(space)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot use motif space {space}: {err}") from None
    feats = [run_features(r)[1] for r in runs]
    n = min(f.shape[0] * f.shape[1] for f in feats)
    g = torch.Generator().manual_seed(0)
    rows = [f.reshape(-1, f.shape[-1]) for f in feats]
    return MotifEmbedder.fit(torch.cat([x[torch.randperm(len(x), generator=g)[:n]] for x in rows]))


def energy_distances(a: Tensor, b: Tensor, chunk: int = 32) -> Tensor:
    """Energy distance between every head of ``a`` [Na, M, D] and of ``b`` [Nb, M', D]:
    ``2 E|x - y| - E|x - x'| - E|y - y'|`` over their pattern embeddings -> [Na, Nb]."""
    a, b = a.double(), b.double()

    def mean_cross(x: Tensor, y: Tensor) -> Tensor:  # [n, M, D], [m, M', D] -> [n, m]
        out = torch.empty(x.shape[0], y.shape[0], dtype=torch.float64)
        for i in range(0, x.shape[0], chunk):
            xi = x[i : i + chunk]  # [c, M, D]
            d = torch.cdist(xi.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
            out[i : i + chunk] = d.view(xi.shape[0], x.shape[1], y.shape[0], y.shape[1]).mean(
                dim=(1, 3)
            )
        return out

    self_a = torch.stack([torch.cdist(h, h).mean() for h in a])  # [Na]
    self_b = torch.stack([torch.cdist(h, h).mean() for h in b])  # [Nb]
    return (2 * mean_cross(a, b) - self_a[:, None] - self_b[None, :]).clamp_min(0.0)


class NearHead(BaseModel):
    head: str
    distance: float


class CrossSimilar(BaseModel):
    """The heads of run B nearest to one head of run A in a shared motif space."""

    run_a: str
    head: str
    run_b: str
    nearest: list[NearHead] = Field(description="nearest first (energy distance)")


def similar_across(
    run_a: str | Path,
    head: str,
    run_b: str | Path,
    *,
    space: str | Path | None = None,
    top: int = 10,
) -> CrossSimilar:
    """Which heads of ``run_b`` are nearest to ``head`` of ``run_a`` (see the module docs).

    ``space``: a saved motif space (default: one fitted on the two runs)."""
    ra, rb = open_run(run_a), open_run(run_b)
    names_a, fa = run_features(ra)
    names_b, fb = run_features(rb)
    try:
        name = head_name(*parse_head(head))
    except ValueError as err:
        raise InputError(str(err)) from None
    if name not in names_a:
        raise InputError(f"{head} is not a head of {ra.path} ({names_a[0]}..{names_a[-1]})")
    emb = _space([ra, rb], space)
    i = names_a.index(name)
    d = energy_distances(emb.embed(fa[i : i + 1]), emb.embed(fb))[0]  # [Nb]
    order = torch.argsort(d, stable=True)[:top].tolist()
    return CrossSimilar(
        run_a=ra.name,
        head=name,
        run_b=rb.name,
        nearest=[NearHead(head=names_b[j], distance=float(d[j])) for j in order],
    )


class CrossMap(BaseModel):
    """Every head of several runs on one 2-D map (from their energy distances)."""

    runs: list[str]
    heads: list[str] = Field(description="'<run>:<head>' for every head of every run")
    method: str
    n_neighbors: int
    coords: list[list[float]]


def _joint(
    runs: list[str | Path], space: str | Path | None
) -> tuple[list[Run], list[str], list[list[str]], Tensor]:
    """The runs, their display names (made unique), each run's head names, and the symmetric
    energy-distance matrix of all their heads in one motif space."""
    opened = [open_run(r) for r in runs]
    if len(opened) < 2:
        raise InputError("name at least two runs to map together")
    emb = _space(opened, space)
    names: list[str] = []
    heads: list[list[str]] = []
    embedded: list[Tensor] = []
    for r in opened:
        n = r.name if r.name not in names else f"{r.name}#{len(names) + 1}"
        names.append(n)
        head_names, feats = run_features(r)
        heads.append(head_names)
        embedded.append(emb.embed(feats))
    m = min(e.shape[1] for e in embedded)
    allh = torch.cat([e[:, :m] for e in embedded])  # [N, m, D]
    dist = energy_distances(allh, allh)
    dist = (dist + dist.T) / 2
    dist.fill_diagonal_(0.0)
    return opened, names, heads, dist


def _layout(dist: Tensor, method: str, n_neighbors: int) -> list[list[float]]:
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            raise InputError("UMAP needs the umap-learn package: pip install umap-learn") from None
        xy = umap.UMAP(n_neighbors=n_neighbors, metric="precomputed", random_state=0)
        return xy.fit_transform(dist.numpy()).tolist()
    if method not in ("isomap", "tsne"):
        raise InputError(f"method must be isomap, tsne or umap, not {method!r}")
    return head_map(dist, n_neighbors=n_neighbors, perplexity=float(n_neighbors))[method]


def map_across(
    runs: list[str | Path],
    *,
    space: str | Path | None = None,
    method: str = "isomap",
    n_neighbors: int = 16,
) -> CrossMap:
    """A 2-D map of the heads of all ``runs`` in one motif space: Isomap, t-SNE or UMAP (when
    umap-learn is installed) on the energy distances; ``n_neighbors`` sets Isomap's and UMAP's
    neighbourhood and t-SNE's perplexity."""
    if method not in ("isomap", "tsne", "umap"):
        raise InputError(f"method must be isomap, tsne or umap, not {method!r}")
    _, names, heads, dist = _joint(runs, space)
    return CrossMap(
        runs=names,
        heads=[f"{n}:{h}" for n, hs in zip(names, heads, strict=True) for h in hs],
        method=method,
        n_neighbors=n_neighbors,
        coords=_layout(dist, method, n_neighbors),
    )


ACROSS_FILE = "motifs/across.json"
ACROSS_NEIGHBORS = (5, 15, 40)


class AcrossMaps(BaseModel):
    """What the app's two-model head map reads (``motifs/across.json`` in each mapped run)."""

    runs: list[str] = Field(description="display names; runs[i] owns heads[i]")
    this_run: int = Field(description="index of the run this file was written into")
    heads: list[list[str]]
    maps: dict[str, list[list[float]]] = Field(
        description="'<method>:<neighbours>' -> [x, y] per head, runs in order"
    )
    nearest: dict[str, dict[str, list[NearHead]]] = Field(
        description="head of this run -> other run -> its nearest heads there"
    )


def write_across(
    runs: list[str | Path],
    *,
    space: str | Path | None = None,
    neighbors: tuple[int, ...] = ACROSS_NEIGHBORS,
    top: int = 10,
) -> list[Path]:
    """Map the heads of ``runs`` together with every method available (Isomap, t-SNE, UMAP when
    installed) at each neighbourhood size, and write into each run ``motifs/across.json``: the
    maps plus, for each of its heads, the ``top`` nearest heads of every other run. The app's
    similar-heads tab shows it. Returns the files written."""
    from headscope.files import read_json, write_json

    opened, names, heads, dist = _joint(runs, space)
    methods = ["isomap", "tsne"]
    try:
        import umap  # type: ignore[import-not-found]  # noqa: F401

        methods.append("umap")
    except ImportError:
        pass
    maps = {f"{m}:{k}": _layout(dist, m, k) for m in methods for k in neighbors}
    starts = np.cumsum([0] + [len(h) for h in heads]).tolist()
    written = []
    for i, r in enumerate(opened):
        nearest: dict[str, dict[str, list[NearHead]]] = {}
        for a, head in enumerate(heads[i]):
            row = dist[starts[i] + a]
            nearest[head] = {}
            for j, other in enumerate(names):
                if j == i:
                    continue
                d = row[starts[j] : starts[j + 1]]
                order = torch.argsort(d, stable=True)[:top].tolist()
                nearest[head][other] = [
                    NearHead(head=heads[j][b], distance=float(d[b])) for b in order
                ]
        out = r.path / ACROSS_FILE
        body = AcrossMaps(runs=names, this_run=i, heads=heads, maps=maps, nearest=nearest)
        write_json(out, body.model_dump(mode="json"))
        manifest = read_json(r.path / "manifest.json")
        manifest["across"] = ACROSS_FILE  # so the app asks for the file only where it exists
        write_json(r.path / "manifest.json", manifest, indent=2)
        written.append(out)
    return written
