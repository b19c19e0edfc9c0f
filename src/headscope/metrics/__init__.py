"""Per-head metrics: a registry of small documented functions, the per-layer input they read,
and the :class:`Accumulator` protocol every streaming reduction of the precompute implements.

Importing this package registers the built-in pattern metrics.
"""

from headscope.metrics import pattern
from headscope.metrics.accumulator import Accumulator
from headscope.metrics.registry import (
    METRICS,
    LayerBatch,
    MetricAccumulator,
    MetricPartial,
    MetricSpec,
    TokenMatches,
    metric_docs,
    model_metric_names,
    register_metric,
    stream_metric_names,
)

__all__ = [
    "METRICS",
    "Accumulator",
    "LayerBatch",
    "MetricAccumulator",
    "MetricPartial",
    "MetricSpec",
    "TokenMatches",
    "metric_docs",
    "model_metric_names",
    "pattern",
    "register_metric",
    "stream_metric_names",
]
