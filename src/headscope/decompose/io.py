"""The saved form of every decomposition: one folder, three files (see docs/decompose.md).

::

    DIR/cfg.json              the config's to_dict(): "kind" ("mtc" | "qk" | "split"),
                              "format_version", sizes, coefficients, model, layer, head(s)
    DIR/weights.safetensors   the parameters, float32, names and shapes per kind
    DIR/stats.json            how well it reconstructs held-out data (optional)

A new folder appears whole or not at all (``atomic_dir``). Loading checks the kind, every
tensor's presence and shape, and gives back exactly the stored bits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from headscope.errors import DataError
from headscope.files import atomic_dir, read_tensors, write_json, write_tensors

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "weights.safetensors"
STATS_FILENAME = "stats.json"
SWEEP_FILENAME = "sweep.json"  # decompose sweep: an MTCSweep
CLUSTERS_FILENAME = "value_clusters.json"  # decompose value-clusters: a LoadingClusterComparison
FORMAT_VERSION = 1


class DecomposeFormatError(DataError):
    """A folder is not a loadable decomposition; the message names the file, key or shape."""


def save_folder(
    path: str | os.PathLike[str],
    cfg: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    stats: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``cfg.json``, ``weights.safetensors`` (and ``stats.json``) into folder ``path``,
    replacing whatever folder was there."""
    path = Path(path)
    weights = {
        name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()
    }
    with atomic_dir(path) as tmp:
        write_tensors(tmp / WEIGHTS_FILENAME, weights, metadata={"format": "pt"})
        write_json(tmp / CFG_FILENAME, {**cfg, "format_version": FORMAT_VERSION}, indent=2)
        if stats is not None:
            write_json(tmp / STATS_FILENAME, dict(stats), indent=2)
    return path


def load_folder(
    path: str | os.PathLike[str], kind: str
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any] | None]:
    """(cfg, tensors, stats or None) of a folder written by :func:`save_folder` for ``kind``."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for required in (cfg_path, weights_path):
        if not required.is_file():
            raise DecomposeFormatError(f"{path} has no {required.name}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DecomposeFormatError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict) or cfg.get("kind") != kind:
        got = cfg.get("kind") if isinstance(cfg, dict) else None
        raise DecomposeFormatError(f"{cfg_path} holds kind {got!r}, expected {kind!r}")
    version = cfg.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise DecomposeFormatError(
            f"{cfg_path} has format_version {version!r}; this headscope reads {FORMAT_VERSION}"
        )
    try:
        tensors = read_tensors(weights_path)
    except (SafetensorError, OSError) as err:
        raise DecomposeFormatError(
            f"{weights_path} is not a readable safetensors file: {err}"
        ) from err
    stats_path = path / STATS_FILENAME
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else None
    return cfg, tensors, stats


def check_shapes(
    where: Path | str, tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise :class:`DecomposeFormatError` unless ``tensors`` has exactly ``expected``'s names
    and shapes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise DecomposeFormatError(f"{where}: missing tensors {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise DecomposeFormatError(
                f"{where}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )
