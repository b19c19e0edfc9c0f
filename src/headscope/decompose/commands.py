"""One call per ``headscope decompose`` command: capture a layer over the given contexts, train,
save the folder(s), return the result model.

Output layouts (each decomposition folder as in docs/decompose.md)::

    mtc:    OUT/<variant>/  one folder per variant trained, OUT/comparison.json (MTCComparison)
    qk:     OUT/            the QK folder, OUT/report.json (QKReport)
    split:  OUT/            the split folder, OUT/report.json (SplitReport, one row)
    sweep:  OUT/sweep.json  (MTCSweep: (L0, MSE, FVE) of each variant at each L1)
    value-clusters: OUT/value_clusters.json (LoadingClusterComparison)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from headscope.decompose.data import LayerData, capture_layer, contexts_from_rows
from headscope.decompose.io import CLUSTERS_FILENAME, SWEEP_FILENAME
from headscope.decompose.mtc import Variant, load_mtc, save_mtc
from headscope.decompose.mtc_train import compare_mtcs
from headscope.decompose.qk import save_qk
from headscope.decompose.qk_report import qk_report
from headscope.decompose.qk_train import train_qk
from headscope.decompose.results import (
    LoadingClusterComparison,
    MTCComparison,
    MTCSweep,
    QKReport,
    SplitReport,
)
from headscope.decompose.split import save_split
from headscope.decompose.split_train import split_examples, train_split
from headscope.decompose.sweep import DEFAULT_L1S, mtc_sweep
from headscope.decompose.value_clusters import DEFAULT_KS, compare_loading_clusters
from headscope.errors import InputError
from headscope.files import write_json
from headscope.model import ModelAdapter
from headscope.model.spec import head_name


def _capture(
    adapter: ModelAdapter,
    contexts: Iterable[torch.Tensor],
    layer: int,
    seq_len: int,
    n_eval: int,
    device: str,
) -> tuple[LayerData, LayerData]:
    ids = contexts_from_rows(list(contexts), seq_len)
    if ids.shape[0] <= n_eval:
        raise InputError(
            f"{ids.shape[0]} contexts of {seq_len} tokens leave none to train on after "
            f"{n_eval} held out: read more (--contexts) or hold out fewer (--eval)"
        )
    return capture_layer(adapter, ids, layer, device=device).split(n_eval)


def decompose_mtc(
    adapter: ModelAdapter,
    contexts: Iterable[torch.Tensor],
    *,
    layer: int,
    out: Path,
    variants: tuple[Variant, ...] = ("mtc", "single_head", "sae_mtc"),
    seq_len: int = 128,
    n_eval: int = 16,
    device: str = "cpu",
    **options: Any,
) -> MTCComparison:
    """Train MTC ``variants`` on ``layer`` (options: :func:`train_mtc`'s) and save them."""
    train, test = _capture(adapter, contexts, layer, seq_len, n_eval, device)
    comparison, trained = compare_mtcs(
        train, test, variants=variants, model_name=adapter.name, **options
    )
    for stats in comparison.rows:
        save_mtc(trained[stats.variant], out / stats.variant, stats.model_dump())  # type: ignore[index]
    write_json(out / "comparison.json", comparison.model_dump(), indent=2)
    return comparison


def decompose_qk(
    adapter: ModelAdapter,
    contexts: Iterable[torch.Tensor],
    *,
    layer: int,
    head: int,
    out: Path,
    seq_len: int = 128,
    n_eval: int = 16,
    device: str = "cpu",
    **options: Any,
) -> QKReport:
    """Train a QK diagonalisation of ``L{layer}H{head}`` (options: :func:`train_qk`'s), save
    it with its feature report."""
    train, test = _capture(adapter, contexts, layer, seq_len, n_eval, device)
    window = adapter.spec.sliding_window[layer]
    model, stats = train_qk(train, test, head, window=window, model_name=adapter.name, **options)
    report = qk_report(model, test, stats, tokens=adapter.tokens)
    save_qk(model, out, stats.model_dump())
    write_json(out / "report.json", report.model_dump(), indent=2)
    return report


def decompose_split(
    adapter: ModelAdapter,
    contexts: Iterable[torch.Tensor],
    *,
    layer: int,
    head: int,
    k: int,
    out: Path,
    seq_len: int = 128,
    n_eval: int = 16,
    device: str = "cpu",
    **options: Any,
) -> SplitReport:
    """Split ``L{layer}H{head}`` into ``k`` sub-heads (options: :func:`train_split`'s), save
    the split with its report."""
    train, test = _capture(adapter, contexts, layer, seq_len, n_eval, device)
    split, stats = train_split(adapter, train, test, [head], k, **options)
    report = SplitReport(
        heads=[head_name(layer, head)],
        rows=[stats],
        examples=split_examples(adapter, split, test),
    )
    save_split(split, out, stats.model_dump())
    write_json(out / "report.json", report.model_dump(), indent=2)
    return report


def decompose_sweep(
    adapter: ModelAdapter,
    contexts: Iterable[torch.Tensor],
    *,
    layer: int,
    out: Path,
    l1s: tuple[float, ...] = DEFAULT_L1S,
    variants: tuple[Variant, ...] = ("mtc", "single_head", "sae_mtc"),
    seq_len: int = 128,
    n_eval: int = 16,
    device: str = "cpu",
    **options: Any,
) -> MTCSweep:
    """Train every MTC variant at every L1 on the same captured contexts (options:
    :func:`train_mtc`'s); write ``OUT/sweep.json``. The models themselves are not kept."""
    train, test = _capture(adapter, contexts, layer, seq_len, n_eval, device)
    sweep = mtc_sweep(train, test, l1s=l1s, variants=variants, model_name=adapter.name, **options)
    write_json(out / SWEEP_FILENAME, sweep.model_dump(), indent=2)
    return sweep


def decompose_value_clusters(
    adapter: ModelAdapter,
    contexts: Iterable[torch.Tensor],
    *,
    layer: int,
    out: Path,
    mtc: Path | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    seq_len: int = 128,
    n_eval: int = 16,
    device: str = "cpu",
    **options: Any,
) -> LoadingClusterComparison:
    """Value SAEs on ``layer`` (and ``layer - 1`` with it), their head-loading cluster sizes
    beside those of the MTC saved in folder ``mtc`` (options:
    :func:`compare_loading_clusters`'s); write ``OUT/value_clusters.json``."""
    ids = contexts_from_rows(list(contexts), seq_len)
    model = load_mtc(mtc, device=device) if mtc is not None else None
    result = compare_loading_clusters(
        adapter, ids, layer, n_eval=n_eval, ks=ks, mtc=model, **options
    )
    write_json(out / CLUSTERS_FILENAME, result.model_dump(), indent=2)
    return result


Result = MTCComparison | QKReport | SplitReport | MTCSweep | LoadingClusterComparison


def run_command(
    adapter: ModelAdapter, contexts: Iterable[torch.Tensor], command: str, **options: Any
) -> tuple[Result, str]:
    """``command`` (``mtc``, ``qk``, ``split``, ``sweep`` or ``value-clusters``) with its
    options -> (result, its text)."""
    from headscope.decompose.mtc_train import format_comparison
    from headscope.decompose.qk_report import format_qk_features
    from headscope.decompose.qk_train import format_qk_table
    from headscope.decompose.split_train import format_split
    from headscope.decompose.sweep import format_sweep
    from headscope.decompose.value_clusters import format_loading_clusters

    if command == "mtc":
        comparison = decompose_mtc(adapter, contexts, **options)
        return comparison, format_comparison(comparison)
    if command == "qk":
        report = decompose_qk(adapter, contexts, **options)
        text = format_qk_table(report.head, [report.stats]) + "\n" + format_qk_features(report)
        return report, text
    if command == "split":
        split = decompose_split(adapter, contexts, **options)
        return split, format_split(split)
    if command == "sweep":
        sweep = decompose_sweep(adapter, contexts, **options)
        return sweep, format_sweep(sweep)
    if command == "value-clusters":
        clusters = decompose_value_clusters(adapter, contexts, **options)
        return clusters, format_loading_clusters(clusters)
    raise InputError(
        f"unknown decompose command {command!r}: use mtc, qk, split, sweep or value-clusters"
    )
