"""The hand-set induction circuit (tests/planted.py): L0H0 previous-token head, L1H0 induction."""

from __future__ import annotations

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
