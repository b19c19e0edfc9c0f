"""Sparse dictionaries over attention activations: TopK SAEs, their training, and head clusters.

Files are SAELens-compatible (``cfg.json`` + ``sae_weights.safetensors``), see :mod:`.sae`.
"""

from headscope.dictionaries.clusters import (
    head_loadings,
    head_names,
    kmeans_sweep,
    plot_cluster_sizes,
)
from headscope.dictionaries.sae import (
    SAE,
    SAEConfig,
    SAEFormatError,
    hook_name_for,
    load_sae,
    parse_hook_name,
    save_sae,
)
from headscope.dictionaries.train import TrainStats, geometric_median, train_sae, train_saes

__all__ = [
    "SAE",
    "SAEConfig",
    "SAEFormatError",
    "TrainStats",
    "geometric_median",
    "head_loadings",
    "head_names",
    "hook_name_for",
    "kmeans_sweep",
    "load_sae",
    "parse_hook_name",
    "plot_cluster_sizes",
    "save_sae",
    "train_sae",
    "train_saes",
]
