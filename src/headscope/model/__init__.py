"""Model adapter: load any supported causal LM and see what each attention head computes."""

from headscope.model.adapter import Capture, HeadWeights, ModelAdapter, NormWeights
from headscope.model.capture import LayerTensors
from headscope.model.spec import ArchSpec, head_name, parse_head

__all__ = [
    "ArchSpec",
    "Capture",
    "HeadWeights",
    "LayerTensors",
    "ModelAdapter",
    "NormWeights",
    "head_name",
    "parse_head",
]
