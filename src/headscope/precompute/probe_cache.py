"""Probe and weight metrics, kept on disk per model weights, settings and code.

The synthetic probes and the weight metrics (``precompute/probes.py``) never read the dataset:
their values depend only on the model's weights, the probe settings and the code that computes
them. The precompute reads them from ``<cache>/probes/<key>.safetensors`` when an earlier run
computed them for the same key, which saves the probes' forward passes (~5k tokens) on every
later run of the same model. The key hashes every byte of every parameter and buffer, their
names, shapes and dtypes, the device, the layers and probe settings, and the source of each
module that defines a probe or weight metric (and of the capture and the adapter), so changed
weights or changed code never read a stale value.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys

import torch
from torch import Tensor

from headscope.files import read_tensors, write_tensors
from headscope.metrics.registry import METRICS, model_metric_names
from headscope.model.loading import cache_dir
from headscope.precompute import probes

_FORMAT = "headscope.probe-cache/1"
_CURVE = "long_prefix_curve"


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=False).items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _code_digest(names: list[str]) -> str:
    h = hashlib.sha256()
    modules = {METRICS[n].fn.__module__ for n in names}
    modules |= {"headscope.precompute.probes", "headscope.model.capture", "headscope.model.adapter"}
    for module in sorted(modules):
        h.update(module.encode())
        h.update(inspect.getsource(sys.modules[module]).encode())
    return h.hexdigest()


def probe_key(probe: probes.Probe) -> str:
    """The cache key of ``probe``'s metrics (see the module docstring)."""
    names = model_metric_names()
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(_weights_digest(probe.adapter.model).encode())
    h.update(_code_digest(names).encode())
    settings = (str(probe.adapter.device), probe.layers, probe.n, probe.length, probe.seed, names)
    h.update(repr(settings).encode())
    return h.hexdigest()[:32]


def probe_metrics(probe: probes.Probe) -> tuple[dict[str, Tensor], Tensor]:
    """Every probe and weight metric ``[L, H]`` (as :func:`probes.run_probes`) and the
    long-prefix curves ``[L, H, 4]``: read from the cache, or computed and stored there."""
    names = model_metric_names()
    try:
        key = probe_key(probe)
    except (RuntimeError, NotImplementedError, TypeError):  # weights not in memory (offloaded)
        return probes.run_probes(probe), probes.long_prefix_curve(probe)
    path = cache_dir() / "probes" / f"{key}.safetensors"
    if path.is_file():
        try:
            stored = read_tensors(path)
            return {n: stored[n] for n in names}, stored[_CURVE]
        except Exception:  # an unreadable cache file is recomputed and replaced
            pass
    table = probes.run_probes(probe)
    curve = probes.long_prefix_curve(probe)
    with contextlib.suppress(OSError):  # a read-only cache costs the next run the probes again
        write_tensors(path, {**table, _CURVE: curve})
    return table, curve
