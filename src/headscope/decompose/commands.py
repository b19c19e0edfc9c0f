"""One call per ``headscope decompose`` command: capture a layer over the given contexts, train,
save the folder(s), return the result model.

Output layouts (each decomposition folder as in docs/decompose.md)::

    mtc:    OUT/<variant>/  one folder per variant trained, OUT/comparison.json (MTCComparison)
    qk:     OUT/            the QK folder, OUT/report.json (QKReport)
    split:  OUT/            the split folder, OUT/report.json (SplitReport, one row)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from headscope.decompose.data import LayerData, capture_layer, contexts_from_rows
from headscope.decompose.mtc import Variant, save_mtc
from headscope.decompose.mtc_train import compare_mtcs
from headscope.decompose.qk import save_qk
from headscope.decompose.qk_report import qk_report
from headscope.decompose.qk_train import train_qk
from headscope.decompose.results import MTCComparison, QKReport, SplitReport
from headscope.decompose.split import save_split
from headscope.decompose.split_train import split_examples, train_split
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


def run_command(
    adapter: ModelAdapter, contexts: Iterable[torch.Tensor], command: str, **options: Any
) -> tuple[MTCComparison | QKReport | SplitReport, str]:
    """``command`` (``mtc``, ``qk`` or ``split``) with its options -> (result, its text)."""
    from headscope.decompose.mtc_train import format_comparison
    from headscope.decompose.qk_report import format_qk_features
    from headscope.decompose.qk_train import format_qk_table
    from headscope.decompose.split_train import format_split

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
    raise InputError(f"unknown decompose command {command!r}: use mtc, qk or split")
