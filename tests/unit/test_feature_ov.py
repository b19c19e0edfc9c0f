"""QK and OV attributions in the feature basis on both sides: exact sums on random edges of a
tiny model with small dictionaries, labelled error terms, and a planted head that moves one known
feature."""

from __future__ import annotations

import random

import pytest
import torch

from headscope.analysis.attribution import ov_attribution, qk_attribution
from headscope.analysis.session import Session
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from tests.planted import CODE, POS, induction_adapter
from tests.tiny_models import tiny_adapter

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"
N_EDGES = 20


def _sae(d_in: int, d_sae: int, site: str, layer: int, seed: int, k: int = 8) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, site=site, layers=(layer,)),
        generator=g,
    )
    with torch.no_grad():  # on the tiny model's residual scale (|x| ~ 0.1)
        sae.W_dec.mul_(0.05)
        sae.b_enc.copy_(0.01 * torch.rand(d_sae, generator=g))
    return sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Residual dictionaries for every layer and a z dictionary for the last layer (whose heads
    have no next-layer residual dictionary to read their output)."""
    root = tmp_path_factory.mktemp("dicts")
    sess = Session(tiny_adapter("qwen3"))
    s = sess.adapter.spec
    for layer in range(s.n_layers):
        save_sae(_sae(s.d_model, 64, "resid", layer, seed=layer), root / f"resid_L{layer}")
    last = s.n_layers - 1
    save_sae(_sae(s.n_heads * s.d_head, 48, "z", last, seed=99), root / f"z_L{last}")
    return sess, DictionarySet(root)


def _edges(sess: Session, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    s = sess.adapter.spec
    n = sess.state(TEXT).n_tokens
    out = []
    for _ in range(N_EDGES):
        q = rng.randrange(1, n)
        out.append(
            (f"L{rng.randrange(s.n_layers)}H{rng.randrange(s.n_heads)}", q, rng.randrange(q + 1))
        )
    return out


def _close(total: float, model: float, mass: float) -> bool:
    """Within 1e-4 relative to the model's number (or to the terms' own scale when the number
    itself is a near-cancellation)."""
    return abs(total - model) <= 1e-4 * max(abs(model), 1e-3 * mass, 1e-9)


def test_qk_in_features_adds_up_to_the_score_on_random_edges(setup):
    sess, dicts = setup
    worst = 0.0
    for head, q, k in _edges(sess, seed=1):
        qk = qk_attribution(sess, TEXT, head, q, k, basis=dicts, top=10_000)
        assert qk.n_terms == len(qk.terms)
        mass = sum(abs(t.value) for t in qk.terms)
        assert _close(qk.total, qk.score, mass), (head, q, k, qk.total, qk.score)
        worst = max(worst, abs(qk.total - qk.score) / max(abs(qk.score), 1e-9))
        layer = int(head[1 : head.index("H")])
        queries = {t.query for t in qk.terms}
        keys = {t.key for t in qk.terms}
        for side in (queries, keys):  # the error and bias rows are there, labelled
            assert f"sae:L{layer}/error" in side and f"sae:L{layer}/b_dec" in side
            assert "bias" in side
    assert worst < 1e-4


def test_ov_feature_pairs_add_up_to_the_heads_output_on_random_edges(setup):
    sess, dicts = setup
    last = sess.adapter.spec.n_layers - 1
    sites = set()
    for head, q, k in _edges(sess, seed=2):
        ov = ov_attribution(sess, TEXT, head, q, k, basis=dicts)
        layer = int(head[1 : head.index("H")])
        assert ov.output_dictionary == (f"z:L{last}" if layer == last else f"resid:L{layer + 1}")
        sites.add(ov.output_dictionary.split(":")[0])
        assert ov.outputs and ov.pairs and ov.n_pairs >= len(ov.pairs)
        by_out: dict[str, float] = {}
        mass: dict[str, float] = {}
        for p in ov.pairs:  # top=200 covers every pair on this small model
            by_out[p.output_feature] = by_out.get(p.output_feature, 0.0) + p.value
            mass[p.output_feature] = mass.get(p.output_feature, 0.0) + abs(p.value)
        assert len(ov.pairs) == ov.n_pairs
        for o in ov.outputs:
            assert _close(o.total, o.model, mass[o.feature]), (head, q, k, o)
            assert _close(by_out[o.feature], o.model, mass[o.feature])
        value_rows = {p.value_feature for p in ov.pairs}
        assert {f"sae:L{layer}/error", f"sae:L{layer}/b_dec", "bias"} <= value_rows
        assert any(p.output_feature.startswith(("sae:L", "zsae:L")) for p in ov.pairs)
    assert sites == {"resid", "z"}


def test_ov_output_reads_match_the_next_layers_own_encoder(setup):
    """The model number of an output feature is the edge's output read by that feature's
    encoder: summed over every key, the head's whole output at the query (from its captured z)."""
    sess, dicts = setup
    head, q, layer, h = "L1H2", 12, 1, 2
    st = sess.state(TEXT)
    nxt = dicts.for_layer(layer + 1)
    W_O = sess.adapter.weights(layer).W_O[h].double()
    whole = st.cap.layers[layer].z[0, q, h].double() @ W_O  # [d]
    summed: dict[str, float] = {}
    for k in range(q + 1):
        ov = ov_attribution(sess, TEXT, head, q, k, basis=dicts)
        for o in ov.outputs:  # the same features (those active at the query) for every key
            summed[o.feature] = summed.get(o.feature, 0.0) + o.model
    assert len(summed) == len(ov.outputs)
    feats = [int(f.split("/")[1]) for f in summed]
    want = whole @ nxt.sae.W_enc.detach().double()[:, feats]
    got = torch.tensor(list(summed.values()), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_the_planted_moved_feature_pair_comes_first(tmp_path):
    """The hand-set induction model's L0H0 copies the key token's code (dims 0-63) into the slot
    (dims 96-159) at the next position. Value feature 5 of layer 0's dictionary is the key token's
    code; output feature 11 of layer 1's dictionary reads that code in the slot; every other
    feature lives on the position dims, which L0H0's values do not read."""
    ad = induction_adapter()
    sess = Session(ad)
    text = "abcdefgh"
    st = sess.state(text)
    q, k = 5, 4
    d = ad.spec.d_model
    code = ad.embed_matrix()[int(st.ids[0, k]), :CODE].float()  # [64] the key token's code
    g = torch.Generator().manual_seed(3)

    def pos_sae(layer: int, n: int = 16) -> SAE:
        sae = SAE(
            SAEConfig(d_in=d, d_sae=n, architecture="standard", site="resid", layers=(layer,))
        )
        with torch.no_grad():
            sae.W_dec.zero_()
            sae.W_dec[:, CODE : CODE + POS] = torch.randn(n, POS, generator=g)
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.fill_(0.5)  # every feature fires
        return sae

    src, dst = pos_sae(0), pos_sae(1)
    with torch.no_grad():
        src.W_dec[5].zero_()
        src.W_dec[5, :CODE] = code / code.norm()
        src.W_enc[:, 5] = src.W_dec[5]
        src.b_enc[5] = 0.0  # activation = the code's length: feature 5 reconstructs it exactly
        dst.W_enc[:, 11] = 0.0
        dst.W_enc[CODE + POS :, 11] = code / code.norm()
    save_sae(src, tmp_path / "resid_L0")
    save_sae(dst, tmp_path / "resid_L1")
    dicts = DictionarySet(tmp_path)
    ov = ov_attribution(sess, text, "L0H0", q, k, basis=dicts)
    assert ov.attention > 0.9
    first = ov.pairs[0]
    assert (first.value_feature, first.output_feature) == ("sae:L0/5", "sae:L1/11"), ov.pairs[:4]
    runner_up = max(abs(p.value) for p in ov.pairs[1:])
    assert abs(first.value) > 10 * runner_up
    assert ov.outputs[0].feature == "sae:L1/11"
    assert ov.outputs[0].total == pytest.approx(ov.outputs[0].model, rel=1e-4)
