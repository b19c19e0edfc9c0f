"""Decompositions of an attention layer that are trained on it: multi-token transcoders, QK
diagonalisation and head splitting ("Progress on Attention").

Data: :func:`capture_layer` keeps one layer's residual input, patterns, q/k/z and output over
a set of contexts (:class:`LayerData`). Each method has a config dataclass, an ``nn.Module``,
``train_*`` / ``evaluate_*`` functions returning pydantic results (:mod:`.results`), and
``save_*`` / ``load_*`` for its folder (``cfg.json`` + ``weights.safetensors`` + ``stats.json``,
see docs/decompose.md). Everything runs on the device its data is on.
"""

from headscope.decompose.data import (
    LayerData,
    capture_layer,
    contexts_from_rows,
    load_layer_data,
    save_layer_data,
)
from headscope.decompose.io import DecomposeFormatError
from headscope.decompose.mtc import MTC, MTCConfig, load_mtc, save_mtc
from headscope.decompose.mtc_train import (
    compare_mtcs,
    evaluate_mtc,
    format_comparison,
    loading_clusters,
    train_mtc,
)
from headscope.decompose.qk import QKConfig, QKDiagonal, load_qk, save_qk
from headscope.decompose.qk_report import format_qk_features, qk_report
from headscope.decompose.qk_train import evaluate_qk, format_qk_table, qk_sweep, train_qk
from headscope.decompose.results import (
    LoadingClusterComparison,
    MTCComparison,
    MTCStats,
    MTCSweep,
    QKReport,
    QKStats,
    SplitReport,
    SplitStats,
)
from headscope.decompose.split import HeadSplit, SplitConfig, load_split, save_split
from headscope.decompose.split_train import (
    evaluate_split,
    format_split,
    head_target,
    init_split,
    shares,
    split_sweep,
    train_split,
)
from headscope.decompose.sweep import format_sweep, mtc_sweep

__all__ = [
    "MTC",
    "DecomposeFormatError",
    "HeadSplit",
    "LayerData",
    "LoadingClusterComparison",
    "MTCComparison",
    "MTCConfig",
    "MTCStats",
    "MTCSweep",
    "QKConfig",
    "QKDiagonal",
    "QKReport",
    "QKStats",
    "SplitConfig",
    "SplitReport",
    "SplitStats",
    "capture_layer",
    "compare_mtcs",
    "contexts_from_rows",
    "evaluate_mtc",
    "evaluate_qk",
    "evaluate_split",
    "format_comparison",
    "format_qk_features",
    "format_qk_table",
    "format_split",
    "format_sweep",
    "head_target",
    "init_split",
    "load_layer_data",
    "load_mtc",
    "load_qk",
    "load_split",
    "loading_clusters",
    "mtc_sweep",
    "qk_report",
    "qk_sweep",
    "save_layer_data",
    "save_mtc",
    "save_qk",
    "save_split",
    "shares",
    "split_sweep",
    "train_mtc",
    "train_qk",
    "train_split",
]
