"""Exactness of QK/OV attributions and the residual decomposition, on every tiny architecture."""

from __future__ import annotations

import random

import pytest
import torch

from headscope.analysis.attribution import composition, ov_attribution, qk_attribution, rank_heads
from headscope.analysis.components import COMPONENTS, Component
from headscope.analysis.inputs import InputError
from headscope.analysis.session import Session
from tests.tiny_models import ARCHS, tiny_adapter

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"


@pytest.mark.parametrize("arch", ARCHS)
def test_components_sum_to_residual(arch):
    sess = Session(tiny_adapter(arch))
    st = sess.state(TEXT)
    for layer in range(sess.adapter.spec.n_layers + 1):
        for pos in (0, 5, st.n_tokens - 1):
            labels, X, flag = COMPONENTS.decompose(sess, st, layer, pos)
            assert len(labels) == X.shape[0] == flag.shape[0]
            assert [str(Component.parse(label)) for label in labels] == labels
            assert (X.sum(0) - sess.resid(st, layer, pos)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_qk_and_ov_sums_are_exact(arch):
    sess = Session(tiny_adapter(arch))
    s = sess.adapter.spec
    rng = random.Random(0)
    n = sess.state(TEXT).n_tokens
    for _ in range(20):
        head = f"L{rng.randrange(s.n_layers)}H{rng.randrange(s.n_heads)}"
        q = rng.randrange(1, n)
        k = rng.randrange(0, q + 1)
        qk = qk_attribution(sess, TEXT, head, q, k)
        assert abs(qk.total - qk.score) <= 1e-4 * max(1.0, abs(qk.score)), (head, q, k)
        if s.attn_softcap:
            cap = s.attn_softcap
            assert qk.capped_score == pytest.approx(
                cap * torch.tanh(torch.tensor(qk.score / cap)).item(), abs=1e-5
            )
        assert sum(m.value for m in qk.query_marginals) == pytest.approx(qk.total, abs=1e-4)
        ov = ov_attribution(sess, TEXT, head, q, k)
        assert ov.max_abs_diff <= 1e-4 * max(1.0, ov.model_norm)
        assert abs(ov.total_norm - ov.model_norm) <= 1e-4 * max(1.0, ov.model_norm)


def test_rank_heads_matches_patterns_and_bad_inputs():
    sess = Session(tiny_adapter("llama"))
    ranked = rank_heads(sess, TEXT, 10, 3)
    s = sess.adapter.spec
    assert len(ranked.heads) == s.n_layers * s.n_heads
    atts = [r.attention for r in ranked.heads]
    assert atts == sorted(atts, reverse=True)
    cap = sess.adapter.run(sess.state(TEXT).ids, patterns=True)
    for r in ranked.heads[:5]:
        layer, h = int(r.head[1:].split("H")[0]), int(r.head.split("H")[1])
        assert r.attention == pytest.approx(float(cap.layers[layer].pattern[0, h, 10, 3]), abs=1e-6)
    with pytest.raises(InputError, match="after query"):
        rank_heads(sess, TEXT, 3, 10)
    with pytest.raises(InputError, match="out of range"):
        qk_attribution(sess, TEXT, "L0H0", 1000, 0)
    with pytest.raises(InputError, match="unknown head"):
        qk_attribution(sess, TEXT, "L9H0", 3, 1)
    with pytest.raises(InputError, match="empty"):
        qk_attribution(sess, "  ", "L0H0", 3, 1)
    comp = composition(sess, TEXT, "L2H1", 12, 4)
    assert all(c.head.startswith(("L0", "L1")) for c in comp.k_composition + comp.q_composition)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "gpt2"])
def test_recomputed_rows_and_logits_match_the_forward(arch):
    """Session rows (sliding windows included) and logits_at equal a full capture."""
    sess = Session(tiny_adapter(arch))
    st = sess.state(TEXT)
    cap = sess.adapter.run(st.ids, patterns=True)
    for layer in range(sess.adapter.spec.n_layers):
        for q in (3, st.n_tokens - 1):
            _, rows = sess.pattern_rows(st, layer, q)
            assert torch.allclose(rows, cap.layers[layer].pattern[0, :, q, : q + 1], atol=1e-6)
    assert torch.allclose(sess.logits_at(st, 7), cap.logits[0, 7], atol=1e-5)


def test_learned_positions_cap_the_text_length():
    sess = Session(tiny_adapter("gpt2"))  # 128 learned positions
    assert sess.max_tokens == 128
    with pytest.raises(InputError, match="limit is 128"):
        sess.state("x" * 200)
    assert Session(tiny_adapter("llama")).max_tokens == 2048  # RoPE: the default limit


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_a_component_at_every_position_is_its_row_of_the_decomposition(arch):
    sess = Session(tiny_adapter(arch))
    st = sess.state(TEXT)
    layer = sess.adapter.spec.n_layers - 1
    labels, X, _ = COMPONENTS.decompose(sess, st, layer, 7)
    for label in ("embed", "bias", "L0H1", "L1.mlp"):
        whole = COMPONENTS.vector(sess, st, label, layer)  # [T, d]
        assert whole.shape == (st.n_tokens, X.shape[1])
        torch.testing.assert_close(whole[7], X[labels.index(label)], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "label", ["L3", "L1H", "mlp", "sae:L2/", "sae:L2/x", "embed ", "L-1H0", "H1"]
)
def test_bad_component_labels_are_one_input_error(label):
    with pytest.raises(InputError, match="unknown component"):
        Component.parse(label)


def _decompose_one_position(sess, st, layer, pos):
    """The decomposition as first written: one position, one layer's heads at a time."""
    from headscope.analysis.components import _layer_parts
    from headscope.model.spec import head_name

    ad, cap = sess.adapter, st.cap
    labels, rows = ["embed"], [cap.get("embed")[0, pos][None]]
    if cap.pos_embed is not None:
        labels.append("pos_embed")
        rows.append(cap.pos_embed[0, pos][None])
    bias = torch.zeros(ad.spec.d_model, dtype=rows[0].dtype)
    for lay in range(layer):
        heads, mlp, b_o = _layer_parts(sess, st, lay, pos)
        labels += [head_name(lay, h) for h in range(ad.spec.n_heads)] + [f"L{lay}.mlp"]
        rows += [heads, mlp[None]]
        bias = bias + b_o
    return [*labels, "bias"], torch.cat([*rows, bias[None]])


@pytest.mark.parametrize("arch", ARCHS)
def test_decomposing_query_and_key_together_gives_the_rows_of_each_alone_bit_for_bit(arch):
    sess = Session(tiny_adapter(arch))
    st = sess.state(TEXT)
    n = st.n_tokens
    for layer in (0, 1, sess.adapter.spec.n_layers):
        for positions in ([n - 1, 3], [5, 5], [0]):
            together = COMPONENTS.decompose_at(sess, st, layer, positions)
            for pos, (labels, X, flag) in zip(positions, together, strict=True):
                want_labels, want_X = _decompose_one_position(sess, st, layer, pos)
                assert labels == want_labels
                assert torch.equal(X, want_X), (arch, layer, pos)
                assert flag.tolist() == [0.0] * (len(labels) - 1) + [1.0]


def test_qk_attribution_runs_its_tiny_ops_on_one_thread_and_restores_the_count():
    sess = Session(tiny_adapter("llama"))
    before = torch.get_num_threads()
    seen = []
    real = sess.pattern_rows

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    sess.pattern_rows = spy  # type: ignore[method-assign]
    qk_attribution(sess, TEXT, "L1H0", 9, 4)
    assert seen == [1]
    assert torch.get_num_threads() == before
