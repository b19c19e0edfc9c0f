"""The intervention curve (headscope.analysis.intervene.intervention_curve) on the planted
induction circuit: the score moves along the curve by exactly (scale - 1) x the attribution terms
of the scaled component, scale 1 is the clean model, and the batched scales equal single passes."""

from __future__ import annotations

import pytest
import torch

from headscope.analysis.attribution import qk_attribution
from headscope.analysis.intervene import curve_text, intervene, intervention_curve
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.operations import OPERATIONS
from tests.planted import induction_model
from tests.tiny_models import tiny_tokenizer

TEXT = "qwertyuiopqwertyuiop"  # position 11 is the second 'q'; the first 'w' is at 2
SCALES = [-1.0, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]


@pytest.fixture(scope="module")
def sess() -> Session:
    return Session(ModelAdapter(induction_model(), tiny_tokenizer(), name="ind", source="test"))


def test_curve_moves_the_score_by_the_attribution_terms(sess: Session) -> None:
    qk = qk_attribution(sess, TEXT, "L1H0", 11, 2, top=10_000)
    from_l0h0 = sum(t.value for t in qk.terms if t.key == "L0H0")
    assert abs(from_l0h0) > 1.0  # the edge really runs through the previous-token head
    c = intervention_curve(sess, TEXT, ["L1H0"], "L0H0", "key", SCALES, 11, 2, target="w")
    assert c.at == [2] and c.target == "w"  # default: scaled at the key only
    head = c.heads[0]
    assert head.score_clean == pytest.approx(qk.score, rel=1e-6)
    for s, score in zip(SCALES, head.score, strict=True):
        expect = (s - 1.0) * from_l0h0
        moved = score - head.score_clean
        assert abs(moved - expect) <= 1e-4 * max(1.0, abs(expect)), (s, moved, expect)
    one = SCALES.index(1.0)
    assert head.score[one] == pytest.approx(head.score_clean, abs=1e-5)
    assert head.attention[one] == pytest.approx(head.attention_clean, abs=1e-6)
    assert c.logit[one] == pytest.approx(c.logit_clean, abs=1e-4)
    # attention on the induction key and the copied token's probability rise with the scale
    assert head.attention[SCALES.index(0.0)] < 0.5 * head.attention_clean
    assert all(a <= b + 1e-6 for a, b in zip(head.attention, head.attention[1:], strict=False))
    assert c.prob[SCALES.index(0.0)] < c.prob[SCALES.index(2.0)]
    assert "scale" in curve_text(c) and "L1H0 attn" in curve_text(c)


def test_curve_points_equal_single_interventions(sess: Session) -> None:
    c = intervention_curve(
        sess, TEXT, ["L1H0"], "L0H0", "key", [0.0, 2.0], 11, 2, freeze_patterns=True
    )
    for i, s in enumerate([0.0, 2.0]):
        one = intervene(sess, TEXT, ["L1H0"], "L0H0", "key", s, 11, 2, True, at=[2])
        assert c.heads[0].score[i] == pytest.approx(one.heads[0].score_after, abs=1e-5)
        assert c.heads[0].attention[i] == pytest.approx(one.heads[0].attention_after, abs=1e-6)


def test_query_side_and_targets(sess: Session) -> None:
    c = intervention_curve(sess, TEXT, ["L1H0"], "embed", "query", [0.0, 1.0], 11, 2, target="e")
    assert c.at == [11] and c.target == "e"
    qk = qk_attribution(sess, TEXT, "L1H0", 11, 2, top=10_000)
    from_embed = sum(t.value for t in qk.terms if t.query == "embed")
    moved = c.heads[0].score[0] - c.heads[0].score_clean
    assert moved == pytest.approx(-from_embed, rel=1e-4, abs=1e-4)
    top = intervention_curve(sess, TEXT, ["L1H0"], "L0H0", "key", [1.0], 11, 2)
    assert top.logit[0] == pytest.approx(max(top.logit[0], top.logit_clean), abs=1e-4)
    assert top.prob_clean >= c.prob_clean  # the default target is the clean top token
    with pytest.raises(InputError, match="one token"):
        intervention_curve(sess, TEXT, ["L1H0"], "L0H0", "key", [0.0], 11, 2, target="qw")
    with pytest.raises(InputError, match="scales"):
        intervention_curve(sess, TEXT, ["L1H0"], "L0H0", "key", [], 11, 2)
    with pytest.raises(InputError, match="scales must be finite"):
        intervention_curve(sess, TEXT, ["L1H0"], "L0H0", "key", [float("nan")], 11, 2)


def test_curve_operation_is_declared() -> None:
    op = next(o for o in OPERATIONS if o.name == "intervention-curve")
    fields = op.request.model_fields
    assert {"scales", "component", "side", "at", "target"} <= set(fields)
    assert torch.is_grad_enabled()  # the no_grad blocks did not leak
