"""The real default model: patterns, greedy prediction, cached load time, exact attributions."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from headscope.analysis.attribution import ov_attribution, qk_attribution

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is Paris. The capital of Germany is"
TEXT = (
    "Mr. and Mrs. Dursley, of number four, Privet Drive, were proud to say that they were "
    "perfectly normal, thank you very much. Mr. Dursley was the director of a firm called "
    "Grunnings, which made drills. In 1776 the colonies declared independence."
)


def test_greedy_next_token_is_berlin(default_adapter):
    ids = default_adapter.tokens.encode_tensor(PROMPT)
    logits = default_adapter.run(ids, patterns=False).logits
    assert default_adapter.tokens.display(int(logits[0, -1].argmax())) == " Berlin"


def test_patterns_equal_eager(default_adapter):
    from headscope.model.loading import resolve

    eager = AutoModelForCausalLM.from_pretrained(
        str(resolve("default").directory), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = default_adapter.tokens.encode_tensor(TEXT)
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True, use_cache=False)
    cap = default_adapter.run(ids, patterns=True)
    worst = max((cap.layers[i].pattern - ref.attentions[i]).abs().max().item() for i in cap.layers)
    print(f"max |pattern - eager| over 30 layers: {worst:.2e}")
    assert worst <= 1e-4
    assert (cap.logits - ref.logits).abs().max().item() <= 1e-3


def test_second_load_is_fast():
    """A fresh process loading the cached default model (the first load de-quantised it)."""
    code = (
        "import time; t0=time.perf_counter(); from headscope.model import ModelAdapter; "
        "t1=time.perf_counter(); ModelAdapter.load('default'); t2=time.perf_counter(); "
        "print(f'{t1-t0:.3f} {t2-t1:.3f}')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imports, load = map(float, out.stdout.split())
    print(f"second load of default: {load:.2f} s (library imports before it: {imports:.2f} s)")
    # Relative to the same process's imports (this machine is shared; a de-quantisation takes
    # tens of seconds, ~50x a cached load): a quiet machine gives 0.4 s against ~2 s of imports.
    assert load < max(2.0, imports), (load, imports)


def test_attributions_exact_on_default(default_session):
    rng = random.Random(0)
    n = default_session.state(TEXT).n_tokens
    t0 = time.perf_counter()
    for _ in range(20):
        head = f"L{rng.randrange(30)}H{rng.randrange(9)}"
        q = rng.randrange(1, n)
        k = rng.randrange(0, q + 1)
        qk = qk_attribution(default_session, TEXT, head, q, k)
        assert abs(qk.total - qk.score) <= 1e-4 * max(1.0, abs(qk.score)), (
            head,
            q,
            k,
            qk.total,
            qk.score,
        )
        ov = ov_attribution(default_session, TEXT, head, q, k)
        assert ov.max_abs_diff <= 1e-4 * max(1.0, ov.model_norm)
    print(f"20 QK+OV attributions on a cached text: {time.perf_counter() - t0:.2f} s")


def test_feature_basis_attributions_exact_on_default(default_session, tmp_path):
    """Exactness holds in a dictionary basis too (any residual SAE; here an untrained one)."""
    from headscope.dictionaries.basis import DictionarySet
    from headscope.dictionaries.sae import SAE, SAEConfig, save_sae

    g = torch.Generator().manual_seed(0)
    for layer in (4, 9):
        cfg = SAEConfig(
            d_in=576, d_sae=1024, k=32, site="resid", layers=(layer,), model_name="default"
        )
        save_sae(SAE(cfg, generator=g), tmp_path / f"resid_L{layer}")
    dicts = DictionarySet(tmp_path)
    n = default_session.state(TEXT).n_tokens
    rng = random.Random(3)
    for layer in (4, 9):
        for _ in range(5):
            head = f"L{layer}H{rng.randrange(9)}"
            q = rng.randrange(1, n)
            k = rng.randrange(0, q + 1)
            qk = qk_attribution(default_session, TEXT, head, q, k, basis=dicts)
            assert abs(qk.total - qk.score) <= 1e-4 * max(1.0, abs(qk.score))
            ov = ov_attribution(default_session, TEXT, head, q, k, basis=dicts)
            assert ov.max_abs_diff <= 1e-4 * max(1.0, ov.model_norm)
