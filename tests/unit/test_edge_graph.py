"""The attention-mediated edge graph ("Tracing Attention Computation Through Feature
Interactions"): every edge it returns is the one-edge head-loadings computation's, its loadings +
residual + MLP sum to it, it finds a planted copying edge on the right head, and the largest
edge it returns is the largest of all candidates."""

from __future__ import annotations

import pytest
import torch

from headscope.analysis.session import Session
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.circuits import edge_head_loadings
from headscope.dictionaries.edges import edge_graph
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.errors import InputError
from tests.planted import CODE, POS, induction_model
from tests.tiny_models import tiny_adapter, tiny_tokenizer
from tests.unit.test_head_loadings import _dense_sae

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"


def _dense_set(sess: Session, root, n: int = 24) -> DictionarySet:
    s = sess.adapter.spec
    for layer in range(s.n_layers + 1):
        # layer n_layers: the final residual (what the last layer's heads write into)
        save_sae(_dense_sae(s.d_model, n, layer, seed=layer), root / f"resid_L{layer}")
    return DictionarySet(root)


@pytest.fixture(scope="module", params=["gpt2", "qwen3", "gemma2", "gpt_neox"])
def setup(request, tmp_path_factory):
    sess = Session(tiny_adapter(request.param))
    return sess, _dense_set(sess, tmp_path_factory.mktemp(f"edges-{request.param}"))


def _rel(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(scale), 1e-12)


@pytest.mark.parametrize("rank_by", ["edge", "heads"])
def test_every_edge_is_the_one_edge_computation_and_sums(setup, rank_by):
    sess, dicts = setup
    n_layers = sess.adapter.spec.n_layers
    g = edge_graph(
        sess, TEXT, dicts, n_layers - 1, 5, 30, top=6, depth=2, expand=2, rank_by=rank_by
    )
    nodes = {n.id: n for n in g.nodes}
    assert g.target == f"L{n_layers - 1}/5@30"
    assert len(g.edges) == 12 and len(g.scored) == 2
    assert 0.9 * 24 * 30 < g.scored[0] <= 24 * 30  # (nearly) every feature fires everywhere
    assert all(n.position > 0 for n in g.nodes)  # BOS sources are left out by default
    worst_sum = worst_match = 0.0
    for e in g.edges:
        src, tgt = nodes[e.source], nodes[e.target]
        assert tgt.layer == src.layer + 1 and src.position <= tgt.position
        parts = sum(h.loading for h in e.heads) + e.residual + e.mlp
        worst_sum = max(worst_sum, _rel(parts, e.edge, e.edge))
        one = edge_head_loadings(
            sess, TEXT, dicts, src.layer, src.index, src.position, tgt.index, tgt.position
        )
        assert one.source.activation == pytest.approx(src.activation, rel=1e-5)
        assert one.target.activation == pytest.approx(tgt.activation, rel=1e-5)
        assert one.edge is not None
        scale = max(abs(one.edge), max(abs(h.loading) for h in one.heads), abs(one.mlp))
        theirs = {h.head: h for h in one.heads}
        worst_match = max(
            worst_match,
            _rel(e.edge, one.edge, scale),
            _rel(e.residual, one.residual, scale),
            _rel(e.mlp, one.mlp, scale),
            *(_rel(h.loading, theirs[h.head].loading, scale) for h in e.heads),
            *(_rel(h.ov, theirs[h.head].ov, max(abs(x.ov) for x in one.heads)) for h in e.heads),
        )
        assert [h.attention for h in e.heads] == pytest.approx(
            [theirs[h.head].attention for h in e.heads], rel=1e-6
        )
    assert worst_sum <= 1e-6, worst_sum
    assert worst_match <= 1e-4, worst_match
    pair0 = g.edges[:6]
    key = (
        (lambda e: abs(sum(h.loading for h in e.heads)))
        if rank_by == "heads"
        else (lambda e: abs(e.edge))
    )
    assert [key(e) for e in pair0] == sorted((key(e) for e in pair0), reverse=True)
    # the second pair explains the top two sources of the first
    firsts = {e.source for e in pair0[:2]}
    assert {e.target for e in g.edges[6:]} <= firsts


def test_the_first_edge_is_the_largest_of_all_candidates(tmp_path):
    """Brute force on a short text: the one-edge computation on every (feature, position)."""
    sess = Session(tiny_adapter("llama"))
    dicts = _dense_set(sess, tmp_path, n=12)
    text = "abcab ca"
    g = edge_graph(sess, text, dicts, 3, 3, -1, top=3)  # layer 3: the final residual
    t = len(g.tokens) - 1
    every = [
        edge_head_loadings(sess, text, dicts, 2, f, p, 3, t).edge or 0.0
        for f in range(12)
        for p in range(1, t + 1)
    ]
    best = sorted(every, key=abs, reverse=True)[:3]
    assert [e.edge for e in g.edges] == pytest.approx(best, rel=1e-4)
    with_bos = edge_graph(sess, text, dicts, 3, 3, -1, top=3, include_bos=True)
    every += [edge_head_loadings(sess, text, dicts, 2, f, 0, 3, t).edge or 0.0 for f in range(12)]
    best = sorted(every, key=abs, reverse=True)[:3]
    assert [e.edge for e in with_bos.edges] == pytest.approx(best, rel=1e-4)


# ----- a planted edge: the hand-set induction model's previous-token head -------------------------
LETTERS = "qwertyuiop"


def _codes() -> torch.Tensor:  # [V, CODE] the model's +-1 token codes
    return induction_model().transformer.wte.weight[:, :CODE].detach()


def _token_sae(layer: int, dims: slice, seed: int) -> SAE:
    """One feature per letter reading the letter's code in ``dims`` (activation ~1 where it is
    there), then 6 random always-on distractors."""
    tok = tiny_tokenizer()
    codes = _codes()
    d = 160
    n = len(LETTERS) + 6
    sae = SAE(
        SAEConfig(d_in=d, d_sae=n, architecture="standard", site="resid", layers=(layer,)),
        generator=torch.Generator().manual_seed(seed),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.5)
        for i, ch in enumerate(LETTERS):
            code = codes[tok.convert_tokens_to_ids(ch)]
            sae.W_enc[dims, i] = code / CODE
            sae.W_dec[i, dims] = code / CODE**0.5
        rand = torch.randn(d, 6, generator=g) * 0.02
        sae.W_enc[:, len(LETTERS) :] = rand
        sae.W_dec[len(LETTERS) :] = rand.T
        sae.b_enc[len(LETTERS) :] = 1.0
    return sae


def test_a_planted_previous_token_edge_comes_first_on_its_head(tmp_path):
    """L0H0 copies the previous token's code into a slot; L0H1 (added here) spreads a scrambled
    copy of every earlier token's code into the same slot. The edge into 'the previous token was
    w' at the 'e' after the second 'w' comes from 'the token is w' one position back, on L0H0."""
    model = induction_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w0 = model.transformer.h[0].attn.c_attn.weight  # [160, 480]: q | k | v, 80 per head
        w0[:CODE, 400 : 400 + CODE] = torch.eye(CODE) * 0.5  # L0H1 value: the token code
        perm = torch.eye(CODE)[torch.randperm(CODE, generator=g)]
        model.transformer.h[0].attn.c_proj.weight[80 : 80 + CODE, CODE + POS :] = perm
    from headscope.model import ModelAdapter

    sess = Session(ModelAdapter(model, tiny_tokenizer(), name="planted-edge", source="test"))
    save_sae(_token_sae(0, slice(0, CODE), 0), tmp_path / "resid_L0")
    save_sae(_token_sae(1, slice(CODE + POS, 160), 1), tmp_path / "resid_L1")
    dicts = DictionarySet(tmp_path)
    text = LETTERS + LETTERS  # positions 1..20; the second 'w' is at 12, the 'e' after it at 13
    w = LETTERS.index("w")
    g_ = edge_graph(sess, text, dicts, 1, w, 13, top=5)
    assert g_.alternatives[0].index == w  # 'previous token was w' is the most active there
    first = g_.edges[0]
    assert first.source == f"L0/{w}@12" and first.target == f"L1/{w}@13"
    assert first.heads[0].head == "L0H0" and first.heads[0].share > 0.9
    assert first.heads[0].attention > 0.9
    assert abs(first.residual) < 1e-6 * abs(first.edge)  # the slot is not where 'w' lives
    assert first.mlp == 0.0  # the model's MLPs are zero
    assert abs(g_.edges[1].edge) < 0.2 * abs(first.edge)
    # the same feature one 'qwertyuiop' earlier is seen by L0H1 only (uniform attention)
    early = edge_graph(sess, text, dicts, 1, w, 13, top=1000)
    far = next(e for e in early.edges if e.source == f"L0/{w}@2")
    assert far.heads[0].head == "L0H1"
    # a target chosen by activation: the same feature
    auto = edge_graph(sess, text, dicts, 1, None, 13, top=1)
    assert auto.target == f"L1/{w}@13"


def test_an_inactive_target_has_no_edges(tmp_path):
    model = induction_model()
    from headscope.model import ModelAdapter

    sess = Session(ModelAdapter(model, tiny_tokenizer(), name="induction", source="test"))
    save_sae(_token_sae(0, slice(0, CODE), 0), tmp_path / "resid_L0")
    save_sae(_token_sae(1, slice(CODE + POS, 160), 1), tmp_path / "resid_L1")
    g = edge_graph(sess, LETTERS, DictionarySet(tmp_path), 1, LETTERS.index("q"), 5)
    assert g.edges == [] and g.scored == []
    assert g.nodes[0].activation == 0.0


def test_bad_requests_are_one_line(setup):
    sess, dicts = setup
    n = sess.adapter.spec.n_layers
    with pytest.raises(InputError, match="target layer must be in 1"):
        edge_graph(sess, TEXT, dicts, 0, 1, 5)
    with pytest.raises(InputError, match="target layer must be in 1"):
        edge_graph(sess, TEXT, dicts, n + 1, 1, 5)
    with pytest.raises(InputError, match="out of range 0..23"):
        edge_graph(sess, TEXT, dicts, 1, 24, 5)
    with pytest.raises(InputError, match="position 99 is out of range"):
        edge_graph(sess, TEXT, dicts, 1, 1, 99)
    with pytest.raises(InputError, match="position -99 is out of range"):
        edge_graph(sess, TEXT, dicts, 1, 1, -99)
    with pytest.raises(InputError, match="depth must be in 1..1"):
        edge_graph(sess, TEXT, dicts, 1, 1, 5, depth=2)
    with pytest.raises(InputError, match="rank_by"):
        edge_graph(sess, TEXT, dicts, 1, 1, 5, rank_by="size")


def test_a_missing_dictionary_is_named(tmp_path):
    sess = Session(tiny_adapter("gpt2"))
    s = sess.adapter.spec
    save_sae(_dense_sae(s.d_model, 8, 2, seed=0), tmp_path / "resid_L2")
    with pytest.raises(InputError, match="no residual dictionary for layer 1"):
        edge_graph(sess, TEXT, DictionarySet(tmp_path), 2, 0, 5)
