"""Head loadings of an edge between features in adjacent layers ("Tracing Attention Computation
Through Feature Interactions"): loadings + bypass = the edge, each head's loading equals the
feature-basis OV pair term of that head, and the MLP bypass is the MLP's own first-order change."""

from __future__ import annotations

import copy

import pytest
import torch

from headscope.analysis.attribution import ov_attribution
from headscope.analysis.session import Session
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.circuits import _mlp_jvp, edge_head_loadings
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.errors import InputError
from headscope.model.spec import norm_factor
from tests.tiny_models import tiny_adapter

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"


def _dense_sae(d: int, n: int, layer: int, seed: int) -> SAE:
    """Every feature fires everywhere (ReLU with a large encoder bias), so any pair is an edge."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(
        SAEConfig(d_in=d, d_sae=n, architecture="standard", site="resid", layers=(layer,)),
        generator=g,
    )
    with torch.no_grad():
        sae.W_dec.mul_(0.05)
        sae.W_enc.copy_(torch.randn(d, n, generator=g) * 0.3)
        sae.b_enc.fill_(5.0)
    return sae


@pytest.fixture(scope="module", params=["gpt2", "qwen3"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"loadings-{request.param}")
    sess = Session(tiny_adapter(request.param))
    s = sess.adapter.spec
    for layer in range(s.n_layers):
        save_sae(_dense_sae(s.d_model, 24, layer, seed=layer), root / f"resid_L{layer}")
    return sess, DictionarySet(root)


EDGES = [(0, 3, 7, 5, 9), (1, 4, 12, 2, 12), (1, 0, 20, 17, 3), (0, 11, 5, 11, 0)]


@pytest.mark.parametrize("vector", ["encoder", "decoder"])
def test_loadings_plus_bypass_sum_to_the_edge(setup, vector):
    sess, dicts = setup
    for layer, f_s, p_s, f_t, p_t in EDGES:
        p_t = max(p_t, p_s)
        out = edge_head_loadings(sess, TEXT, dicts, layer, f_s, p_s, f_t, p_t, target_vector=vector)
        assert out.target_vector == vector
        parts = sum(h.loading for h in out.heads) + out.residual + out.mlp
        assert out.edge is not None
        assert abs(parts - out.edge) <= 1e-4 * max(abs(out.edge), 1e-9)
        assert len(out.heads) == sess.adapter.spec.n_heads
        assert abs(sum(h.share for h in out.heads) - 1) < 1e-6
        if p_s != p_t:
            assert out.residual == 0.0
        else:
            src = dicts.for_layer(layer).sae
            tgt = dicts.for_layer(layer + 1).sae
            t_vec = tgt.W_enc[:, f_t] if vector == "encoder" else tgt.W_dec[f_t]
            want = (
                out.source.activation
                * out.target.activation
                * float(src.W_dec[f_s].detach() @ t_vec.detach())
            )
            assert out.residual == pytest.approx(want, rel=1e-5)
        assert out.mlp != 0.0  # the tiny models' MLPs are random: the bypass is there


def test_each_heads_loading_is_its_feature_pair_term(setup):
    """A different code path: the OV attribution in the feature basis on both sides reads each
    value row's output through the next layer's encoder; for the source feature's row and the
    target feature it is the head's loading divided by a_t."""
    sess, dicts = setup
    layer, f_s, p_s, f_t, p_t = 1, 4, 9, 2, 15
    out = edge_head_loadings(sess, TEXT, dicts, layer, f_s, p_s, f_t, p_t)
    for h in out.heads:
        ov = ov_attribution(sess, TEXT, h.head, p_t, p_s, basis=dicts, top_pairs=10_000)
        pair = [
            p.value
            for p in ov.pairs
            if p.value_feature == f"sae:L{layer}/{f_s}"
            and p.output_feature == f"sae:L{layer + 1}/{f_t}"
        ]
        assert len(pair) == 1
        assert h.loading == pytest.approx(pair[0] * out.target.activation, rel=1e-4, abs=1e-9)


def test_the_mlp_bypass_is_the_mlps_first_order_change(setup):
    """Central differences of the real MLP module on its frozen-norm input."""
    sess, _ = setup
    ad, s = sess.adapter, sess.adapter.spec
    st = sess.state(TEXT)
    layer, pos = 1, 8
    g = torch.Generator().manual_seed(5)
    mid = sess.resid(st, layer + 1, pos).double() - st.cap.mlp_contrib[layer][0, pos].double()
    delta = torch.randn(s.d_model, generator=g, dtype=torch.float64) * mid.norm() / s.d_model**0.5
    got = _mlp_jvp(sess, st, layer, pos, delta)
    block = ad.layer(layer)
    ln_mod = getattr(block, s.layout.ln_mlp)
    f = norm_factor(mid, s.norm).double()
    w = ln_mod.weight.detach().double() + s.norm.weight_offset
    b = getattr(ln_mod, "bias", None)

    mlp64 = copy.deepcopy(getattr(block, s.layout.mlp)).double()  # float32 would drown eps

    def mlp_at(x):
        xc = x - x.mean() if s.norm.kind == "layer" else x
        u = xc * f * w + (b.detach().double() if b is not None else 0.0)
        with torch.no_grad():
            return mlp64(u[None, None])[0, 0]

    eps = 1e-3
    fd = (mlp_at(mid + eps * delta) - mlp_at(mid - eps * delta)) / (2 * eps)
    assert fd.abs().max() > 0
    assert (got - fd).abs().max() <= 1e-4 * fd.abs().max()


def test_bad_requests_are_one_line(setup):
    sess, dicts = setup
    with pytest.raises(InputError, match="target_vector"):
        edge_head_loadings(sess, TEXT, dicts, 0, 1, 2, 3, 4, target_vector="both")
    with pytest.raises(InputError, match="out of range"):
        edge_head_loadings(sess, TEXT, dicts, 0, 99, 2, 3, 4)
