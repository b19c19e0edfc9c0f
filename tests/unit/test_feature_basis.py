"""Feature-basis attributions, virtual weights and head loadings on a tiny model with planted
dictionaries (features set by hand)."""

from __future__ import annotations

import random

import pytest
import torch

from headscope.analysis.attribution import ov_attribution, qk_attribution
from headscope.analysis.session import Session
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.circuits import edge_head_loadings, projected_features, virtual_weights
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.errors import InputError
from tests.tiny_models import tiny_adapter

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"


def _sae(
    d_in: int, d_sae: int, layer: int, seed: int, arch: str = "topk", k: int | None = 8
) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, site="resid", layers=(layer,)),
        generator=g,
    )
    with torch.no_grad():  # on the tiny model's residual scale (|x| ~ 0.1)
        sae.W_dec.mul_(0.05)
        sae.b_enc.copy_(0.01 * torch.rand(d_sae, generator=g))
    return sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicts")
    sess = Session(tiny_adapter("qwen3"))
    d = sess.adapter.spec.d_model
    for layer in range(sess.adapter.spec.n_layers):
        save_sae(_sae(d, 64, layer, seed=layer), root / f"resid_L{layer}")
    return sess, root, DictionarySet(root)


def test_feature_basis_sums_are_exact(setup):
    sess, _, dicts = setup
    rng = random.Random(1)
    n = sess.state(TEXT).n_tokens
    for _ in range(10):
        head = f"L{rng.randrange(3)}H{rng.randrange(4)}"
        q = rng.randrange(1, n)
        k = rng.randrange(0, q + 1)
        qk = qk_attribution(sess, TEXT, head, q, k, basis=dicts)
        assert abs(qk.total - qk.score) <= 1e-4 * max(1.0, abs(qk.score))
        labels = {t.query for t in qk.terms} | {m.component for m in qk.query_marginals}
        assert any(lab.endswith("/error") for lab in labels) and any(
            lab.startswith("sae:L") for lab in labels
        )
        ov = ov_attribution(sess, TEXT, head, q, k, basis=dicts)
        assert ov.max_abs_diff <= 1e-4 * max(1.0, ov.model_norm)


def test_virtual_weights_rank_the_planted_partner_first(setup, tmp_path):
    """Plant query feature 7 whose query-space image is exactly key feature 3's key-space image."""
    sess, _, _ = setup
    ad = sess.adapter
    layer, h = 1, 2
    sae = _sae(ad.spec.d_model, 64, layer, seed=11)
    folder = tmp_path / "planted"
    save_sae(sae, folder)
    dicts = DictionarySet(folder)
    key_img = projected_features(ad, dicts.for_layer(layer), layer, h, "key")[3]  # [D]
    # Solve for a residual direction x with x_n @ W_Q[h] (QK-norm weight applied) = key_img.
    ln = ad.ln_attn(layer).weight.float()
    qn = ad.qk_norm(layer)[0].float()
    A = (ln[:, None] * ad.weights(layer).W_Q[h].float()) * qn[None, :]  # [d, D]
    x = torch.linalg.lstsq(A.T, key_img[:, None]).solution[:, 0]
    with torch.no_grad():
        sae.W_dec[7] = x
    save_sae(sae, folder)
    out = virtual_weights(ad, DictionarySet(folder), f"L{layer}H{h}", 3, side="key")
    assert out.other_side[0].index == 7
    assert out.other_side[0].cosine > 0.99


def test_head_loadings_put_the_planted_head_first(setup, tmp_path):
    """The target feature's encoder reads exactly what head L1H3's OV writes from the source
    feature, so L1H3 carries the edge."""
    sess, _, _ = setup
    ad = sess.adapter
    d = ad.spec.d_model
    src = _sae(d, 32, 1, seed=21, arch="standard", k=None)
    tgt = _sae(d, 32, 2, seed=22, arch="standard", k=None)
    with torch.no_grad():
        src.b_enc.fill_(5.0)  # every feature active everywhere, so a_s, a_t > 0
        tgt.b_enc.fill_(5.0)
        w = ad.weights(1)
        v_s = src.W_dec[4] * ad.ln_attn(1).weight
        written = v_s @ w.W_V[w.kv_of_head[3]] @ w.W_O[3]  # [d]
        tgt.W_enc[:, 9] = 10 * written / written.norm()
    save_sae(src, tmp_path / "resid_L1")
    save_sae(tgt, tmp_path / "resid_L2")
    out = edge_head_loadings(sess, TEXT, DictionarySet(tmp_path), 1, 4, 3, 9, 12)
    assert out.heads[0].head == "L1H3", out.heads
    assert out.source.activation > 0 and out.target.activation > 0


def test_a_dictionary_row_at_every_position_is_its_row_of_the_decomposition(setup):
    from headscope.analysis.intervene import intervene

    sess, _, dicts = setup
    st = sess.state(TEXT)
    layer, pos = 2, 9
    labels, X, _ = dicts.decompose(sess, st, layer, pos)
    feature = next(lab for lab in labels if lab.startswith("sae:L2/") and lab[7:].isdigit())
    for label in (feature, "sae:L2/b_dec", "sae:L2/error"):
        whole = dicts.vector(sess, st, label, layer)  # [T, d]
        torch.testing.assert_close(whole[pos], X[labels.index(label)], atol=1e-5, rtol=1e-5)
    # a feature can be scaled inside a head's query, at one position, like any component
    out = intervene(sess, TEXT, ["L2H1"], feature, "query", 0.0, pos, 3, at=[pos], basis=dicts)
    assert out.heads[0].score_after != pytest.approx(out.heads[0].score_before, abs=1e-9)
    with pytest.raises(InputError, match="not a row of layer 2"):
        dicts.vector(sess, st, "sae:L1/3", layer)
