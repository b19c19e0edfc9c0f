"""Adapter tier 1: tiny random models of every architecture, built in-process."""

from __future__ import annotations

import pytest
import torch

from headscope.model.capture import eager_attention
from tests.tiny_models import ARCHS, build, random_tokens, tiny_adapter


def _eager_patterns(model, ids):
    out = model(input_ids=ids, output_attentions=True, use_cache=False)
    return out.logits, out.attentions


@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_match_eager_and_logits_unchanged(arch):
    ref = build(arch, attn="eager")
    ids = random_tokens(12, seed=1, batch=2)
    with torch.no_grad():
        ref_logits, ref_att = _eager_patterns(ref, ids)
    ad = tiny_adapter(arch)
    cap = ad.run(ids, patterns=True)
    assert len(cap.layers) == ad.spec.n_layers
    for layer, t in cap.layers.items():
        assert t.pattern is not None
        assert (t.pattern - ref_att[layer]).abs().max().item() <= 1e-5, layer
        rows = t.pattern.sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert (cap.logits - ref_logits).abs().max().item() <= 1e-5
    # Without capture the adapter runs fused SDPA: logits unchanged too.
    plain = ad.run(ids, layers=[], patterns=False)
    assert (plain.logits - ref_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_bf16_patterns_are_bit_identical_to_eager(arch):
    """The precompute's path (bf16, store=False, patterns in reused workspace buffers, GQA heads
    multiplied as groups) reproduces transformers' eager bf16 attention exactly."""
    ref = build(arch, attn="eager").to(torch.bfloat16)
    ids = random_tokens(16, seed=3, batch=2)
    with torch.no_grad():
        ref_logits, ref_att = _eager_patterns(ref, ids)
    ad = tiny_adapter(arch)
    ad.model.to(torch.bfloat16)
    seen: dict[int, torch.Tensor] = {}
    buffers: set[int] = set()

    def keep(t):
        buffers.add(t.pattern.data_ptr())
        seen[t.layer] = t.pattern.clone()

    logits = ad.run(ids, patterns=True, store=False, on_layer=keep).logits
    assert len(seen) == ad.spec.n_layers
    assert len(buffers) == 1  # every layer's pattern was computed into the same buffer
    for layer, pattern in seen.items():
        # eager returns its float32 softmax cast to the model's dtype
        assert torch.equal(pattern.to(torch.bfloat16), ref_att[layer]), layer
    assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_outputs_sum_to_attention_output(arch):
    ad = tiny_adapter(arch)
    ids = random_tokens(10, seed=2)
    cap = ad.run(ids, residuals=True)
    for layer, t in cap.layers.items():
        per_head = ad.head_outputs(t.z, layer)  # [B, T, H, d]
        total = per_head.sum(-2) + ad.weights(layer).b_O
        assert (total - cap.attn_out[layer]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_qkv_weights_reproduce_captured_q_k_v(arch):
    """Head-major weights + frozen norms + RoPE reproduce the captured q, k, v exactly."""
    ad = tiny_adapter(arch)
    ids = random_tokens(9, seed=3)
    cap = ad.run(ids, residuals=True)
    s = ad.spec
    for layer, t in cap.layers.items():
        x = cap.resid_pre[layer][0]  # [T, d]
        ln = ad.ln_attn(layer)
        from headscope.model.spec import norm_factor

        xn = ad.apply_norm_frozen(x, norm_factor(x, s.norm), ln)
        if ln.bias is not None:
            xn = xn + ln.bias
        w = ad.weights(layer)
        q = torch.einsum("td,hdk->htk", xn, w.W_Q) + w.b_Q[:, None]
        k = torch.einsum("td,hdk->htk", xn, w.W_K) + w.b_K[:, None]
        v = torch.einsum("td,hdk->htk", xn, w.W_V) + w.b_V[:, None]
        qk = ad.qk_norm(layer)
        if qk is not None:
            q = q * norm_factor(q, s.norm) * qk[0]
            k = k * norm_factor(k, s.norm) * qk[1]
        if layer in cap.rope:
            cos, sin = cap.rope[layer]
            q = ad.apply_rope(q, cos[0][None], sin[0][None], s.rotary_dim)
            k = ad.apply_rope(k, cos[0][None], sin[0][None], s.rotary_dim)
        assert (q - t.q[0]).abs().max().item() <= 1e-5
        assert (k - t.k[0]).abs().max().item() <= 1e-5
        assert (v - t.v[0]).abs().max().item() <= 1e-5


def test_mechanisms_are_exercised():
    specs = {a: tiny_adapter(a).spec for a in ARCHS}
    assert any(s.n_kv_heads < s.n_heads for s in specs.values())  # GQA
    assert any(s.qk_norm for s in specs.values())
    assert any(s.attn_softcap for s in specs.values())
    assert any(w is not None for s in specs.values() for w in s.sliding_window)
    assert specs["gpt2"].positional == "learned" and specs["gpt2"].norm.kind == "layer"
    assert (
        specs["gpt_neox"].parallel_residual
        and specs["gpt_neox"].rotary_dim < specs["gpt_neox"].d_head
    )


def test_sliding_window_eager_attention_masks_far_keys():
    q = torch.randn(1, 2, 8, 4)
    k = torch.randn(1, 1, 8, 4)
    _, pattern, _ = eager_attention(q, k, k, None, 0.5, window=3)
    far = torch.tril(torch.ones(8, 8), diagonal=-3).bool()
    assert pattern[..., far].abs().max() == 0


def test_token_display_keeps_spaces_newlines_and_partial_bytes():
    ad = tiny_adapter("llama")
    ids = ad.tokens.encode("a b\né")  # the byte tokenizer splits é into two byte tokens
    shown = ad.tokens.displays(ids)
    assert shown == ["<bos>", "a", " ", "b", "\n", "\\xc3", "\\xa9"]
    assert ids[0] == ad.tokens.bos_id


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_out_norm_is_the_norm_of_each_heads_output(arch):
    from headscope.precompute.runner import head_out_norm

    ad = tiny_adapter(arch)
    cap = ad.run(random_tokens(9, seed=4, batch=2))
    for layer, t in cap.layers.items():
        expected = ad.head_outputs(t.z, layer).norm(dim=-1).transpose(1, 2)  # [B, H, T]
        assert torch.allclose(head_out_norm(ad, t.z, layer), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stop_after_computes_nothing_after_that_layer(arch):
    ad = tiny_adapter(arch)
    ids = random_tokens(9, seed=5, batch=2)
    full = ad.run(ids, residuals=True, patterns=False)
    ran: list[int] = []
    hooks = [ad.layer(i).register_forward_hook(lambda *_, i=i: ran.append(i)) for i in range(3)]
    try:
        cap = ad.run(ids, patterns=False, logits=False, resid_layers=[1, 2], stop_after=1)
        assert ran == [0, 1] and sorted(cap.layers) == [0, 1]
        # the residual entering the next layer is still captured
        assert torch.equal(cap.resid_pre[2], full.resid_pre[2])
        assert torch.equal(cap.resid_pre[1], full.resid_pre[1]) and cap.logits is None
        ran.clear()
        cap = ad.run(ids, patterns=False, logits=False, resid_layers=[0], stop_after=-1)
        assert ran == [] and torch.equal(cap.resid_pre[0], full.resid_pre[0])
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="logits"):
        ad.run(ids, stop_after=1)
    with pytest.raises(ValueError, match="stop_after"):
        ad.run(ids, logits=False, stop_after=3)


@pytest.mark.parametrize("scaling", [0.125, 0.3535533905932738])  # power of two, and not
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_attention_is_bit_identical_to_transformers_formula(scaling, dtype):
    """Grouped GQA products, the power-of-two scaling applied to the queries, the blockwise
    causal mask and the workspace buffers change no bit of scores, pattern or output."""
    from headscope.model.capture import Workspace

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 6, 70, 16, generator=g) * 3).to(dtype)
    k = (torch.randn(2, 2, 70, 16, generator=g) * 3).to(dtype)
    v = torch.randn(2, 2, 70, 16, generator=g).to(dtype)
    # transformers' eager attention, step by step
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    ref_scores = torch.matmul(q, kk.transpose(-1, -2)) * scaling
    ref_scores = ref_scores.masked_fill(~torch.ones(70, 70, dtype=torch.bool).tril(), -torch.inf)
    ref_pattern = torch.softmax(ref_scores, dim=-1, dtype=torch.float32)
    ref_out = torch.matmul(ref_pattern.to(dtype), vv).transpose(1, 2)
    for workspace in (None, Workspace()):
        scores, pattern, out = eager_attention(q, k, v, None, scaling, workspace=workspace)
        assert torch.equal(scores, ref_scores)
        assert torch.equal(pattern, ref_pattern)
        assert torch.equal(out, ref_out)


def test_cached_weights_die_with_their_adapter():
    """Derived weights are cached per adapter (a second call returns the same object), and an
    adapter dropped by its user is freed with its model: a class-wide functools.cache kept
    every adapter that ever called it alive."""
    import gc
    import weakref

    ad = tiny_adapter("llama")
    other = tiny_adapter("llama", seed=1)
    w = ad.weights(0)
    assert ad.weights(0) is w
    assert ad.ln_attn(0) is ad.ln_attn(0)
    assert ad.embed_matrix() is ad.embed_matrix()
    assert not torch.equal(other.weights(0).W_Q, w.W_Q)  # no cache shared between adapters
    ad.ln_final(), ad.unembed(), ad.qk_norm(0), ad.post_norm(0, "attn"), ad.output_basis(0)
    adapter_ref, model_ref = weakref.ref(ad), weakref.ref(ad.model)
    del ad, w
    gc.collect()
    assert adapter_ref() is None
    assert model_ref() is None
