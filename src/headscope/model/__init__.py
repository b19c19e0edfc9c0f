"""Model adapter: load any supported causal LM and see what each attention head computes."""

from headscope.model.adapter import ModelAdapter
from headscope.model.capture import LayerTensors
from headscope.model.records import Capture, HeadWeights, NormWeights
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
