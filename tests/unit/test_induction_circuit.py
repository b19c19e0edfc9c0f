"""The hand-set induction circuit (tests/planted.py): L0H0 previous-token head, L1H0 induction."""

from __future__ import annotations

import pytest

from headscope.analysis.attribution import composition, qk_attribution, rank_heads
from headscope.analysis.session import Session
from headscope.model import ModelAdapter
from tests.planted import induction_model as _model
from tests.tiny_models import tiny_tokenizer


def test_induction_head_reads_previous_token_head():
    sess = Session(ModelAdapter(_model(), tiny_tokenizer(), name="induction", source="test"))
    text = "qwertyuiopqwertyuiop"  # position 11 is the second 'q'; the first 'w' is at 2
    qk = qk_attribution(sess, text, "L1H0", 11, 2)
    assert abs(qk.total - qk.score) <= 1e-4 * max(1, abs(qk.score))
    top = qk.terms[0]
    assert (top.query, top.key) == ("embed", "L0H0"), qk.terms[:3]
    assert qk.attention > 0.5
    ranked = rank_heads(sess, text, 11, 2)
    assert ranked.heads[0].head == "L1H0"
    comp = composition(sess, text, "L1H0", 11, 2)
    first = comp.k_composition[0]
    assert first.head == "L0H0" and first.attends_to == 1  # L0H0 at 'w'(2) looks at 'q'(1)


def test_intervening_at_the_key_moves_the_score_by_the_attributed_terms():
    """Scaling L0H0's output at the key inside L1H0's key input changes the score by exactly
    (scale - 1) x the sum of the QK terms whose key side is L0H0; scale 1 changes nothing."""
    from headscope.analysis.intervene import intervene

    sess = Session(ModelAdapter(_model(), tiny_tokenizer(), name="induction", source="test"))
    text = "qwertyuiopqwertyuiop"
    qk = qk_attribution(sess, text, "L1H0", 11, 2, top=10_000)
    from_l0h0 = sum(t.value for t in qk.terms if t.key == "L0H0")
    assert qk.n_terms == len(qk.terms)
    for scale in (0.0, 0.5, 2.0):
        out = intervene(sess, text, ["L1H0"], "L0H0", "key", scale, 11, 2, at=[2])
        h = out.heads[0]
        assert h.score_before == pytest.approx(qk.score, rel=1e-6)
        moved = h.score_after - h.score_before
        expect = (scale - 1.0) * from_l0h0
        assert abs(moved - expect) <= 1e-4 * max(1.0, abs(expect)), (scale, moved, expect)
    same = intervene(sess, text, ["L1H0"], "L0H0", "key", 1.0, 11, 2, at=[2])
    assert same.heads[0].score_after == same.heads[0].score_before
    assert same.heads[0].row_after == pytest.approx(same.heads[0].row_before, abs=1e-6)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-7)
    zeroed = intervene(sess, text, ["L1H0"], "L0H0", "key", 0.0, 11, 2, at=[2])
    assert zeroed.heads[0].attention_after < 0.5 * zeroed.heads[0].attention_before


def test_ov_readouts_show_the_induction_head_copying_the_attended_token():
    from headscope.analysis.attribution import ov_attribution

    sess = Session(ModelAdapter(_model(), tiny_tokenizer(), name="induction", source="test"))
    ov = ov_attribution(sess, "qwertyuiopqwertyuiop", "L1H0", 11, 2)
    assert ov.key_token == "w"
    assert ov.key_token_readout[0].token == "w"  # its OV circuit alone copies the token
    assert ov.key_token_rank == 1  # and so does this edge's actual output
