"""Sweeps, QK geometry and interventions on tiny models."""

from __future__ import annotations

import pytest
import torch

from headscope.analysis.attribution import qk_attribution
from headscope.analysis.geometry import qk_geometry
from headscope.analysis.inputs import InputError
from headscope.analysis.intervene import intervene
from headscope.analysis.session import Session
from headscope.analysis.sweep import sweep
from headscope.operations.requests import ValueRange
from tests.tiny_models import tiny_adapter

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"


@pytest.fixture(scope="module")
def sess():
    return Session(tiny_adapter("qwen3"))


def test_sweep_matches_single_runs(sess):
    values = ValueRange.model_validate("10:30:4").values()
    out = sweep(sess, "x {} y", values, ["L1H2", "L2H0"], query="slot:-1", key="slot:0")
    assert out.values == ["10", "14", "18", "22", "26"]
    for i, value in enumerate(values):
        pos = out.positions[i]
        cap = sess.adapter.run(sess.adapter.tokens.encode_tensor(f"x {value} y"), patterns=True)
        expect = float(cap.layers[1].pattern[0, 2, pos.query, pos.key])
        assert out.attention["L1H2"][i] == pytest.approx(expect, abs=1e-6)
    with pytest.raises(InputError, match="exactly one"):
        sweep(sess, "no slot", ["1"], ["L0H0"])
    with pytest.raises(InputError, match="only"):
        sweep(sess, "x {} y", ["1"], ["L0H0"], query="slot:5")


def test_geometry_shapes_and_self_consistency(sess):
    qs = [f"the country [[{c}]]" for c in "pqrs"]
    ks = [f"a city [[{c}]] is" for c in "pqrs"]
    out = qk_geometry(sess, qs, ks, ["L0H0", "L2H3"])
    cos = torch.tensor(out.heads["L2H3"].cosine)
    assert cos.shape == (4, 4) and cos.abs().max() <= 1 + 1e-5
    assert out.query_labels == list("pqrs")
    same = qk_geometry(sess, qs, qs, ["L0H0"])
    res = torch.tensor(same.residual.cosine)
    assert torch.allclose(res.diagonal(), torch.ones(4), atol=1e-5)
    with pytest.raises(InputError, match="mark exactly one"):
        qk_geometry(sess, ["no mark"], ks, None)


def test_intervention_matches_attribution(sess):
    """Zeroing a component on the query side of one head shifts that head's score on every key
    j by exactly -(component's q part) . k_j * scale; scale 1 changes nothing."""
    from headscope.analysis.attribution import side_vectors

    head, q, k = "L2H1", 12, 4
    st = sess.state(TEXT)
    labels, Q = side_vectors(sess, st, 2, 1, q, "q")
    q_part = Q[labels.index("L1H0")]  # [D]
    kv = int(sess.adapter.weights(2).kv_of_head[1])
    keys = st.cap.layers[2].k[0, kv, : q + 1].double()  # [q+1, D]
    scores, _ = sess.pattern_rows(st, 2, q)
    expected = torch.softmax(
        scores[1].double() - sess.adapter.spec.attn_scale * keys @ q_part, -1
    ).float()
    out = intervene(sess, TEXT, [head], "L1H0", "query", 0.0, query=q, key=k)
    assert torch.allclose(torch.tensor(out.heads[0].row_after), expected, atol=1e-5)
    assert out.heads[0].attention_after == pytest.approx(float(expected[k]), abs=1e-5)
    qk = qk_attribution(sess, TEXT, head, q, k)
    marginal = next(m.value for m in qk.query_marginals if m.component == "L1H0")
    assert float(sess.adapter.spec.attn_scale * keys[k] @ q_part) == pytest.approx(
        marginal, abs=1e-5
    )
    same = intervene(sess, TEXT, [head], "L1H0", "query", 1.0, query=q, key=k)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.heads[0].attention_after == pytest.approx(same.heads[0].attention_before, abs=1e-6)
    frozen = intervene(
        sess, TEXT, [head], "embed", "key", 0.0, query=q, key=k, freeze_patterns=True
    )
    assert frozen.heads[0].attention_after != pytest.approx(
        frozen.heads[0].attention_before, abs=1e-4
    )
    with pytest.raises(InputError, match="not upstream"):
        intervene(sess, TEXT, ["L1H0"], "L1H0", "query", 0.0, query=q, key=k)
