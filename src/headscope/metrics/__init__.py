"""Per-head metrics: a registry of small documented functions, and the streaming accumulator.

Importing this package registers the built-in pattern metrics.
"""

from headscope.metrics import pattern
from headscope.metrics.registry import (
    METRICS,
    LayerBatch,
    MetricAccumulator,
    MetricPartial,
    MetricSpec,
    TokenMatches,
    metric_docs,
    register_metric,
    stream_metric_names,
)

__all__ = [
    "METRICS",
    "LayerBatch",
    "MetricAccumulator",
    "MetricPartial",
    "MetricSpec",
    "TokenMatches",
    "metric_docs",
    "pattern",
    "register_metric",
    "stream_metric_names",
]
