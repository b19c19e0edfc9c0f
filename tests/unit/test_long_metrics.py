"""Long-range metrics (attention_beyond_64 / _512, long_range_share) against loop definitions."""

from __future__ import annotations

import pytest
import torch

from headscope.metrics import METRICS, MetricAccumulator
from tests.unit.test_metrics import make_batch, random_causal

LONG = ["attention_beyond_64", "attention_beyond_512", "long_range_share"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _loop(pattern: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """The docstrings' formulas, one (sequence, head, query) at a time, in float64."""
    B, H, T, _ = pattern.shape
    p = pattern.double()
    out = {}
    for name, d in (("attention_beyond_64", 64), ("attention_beyond_512", 512)):
        value = torch.full((H,), float("nan"), dtype=torch.float64)
        for h in range(H):
            shares = [
                p[b, h, q, 1 : max(1, q - d + 1)].sum()
                for b in range(B)
                for q in range(1, T)
                if valid[b, q]
            ]
            if shares:
                value[h] = torch.stack(shares).mean()
        out[name] = value
    share = torch.full((H,), float("nan"), dtype=torch.float64)
    for h in range(H):
        far = real = 0.0
        for b in range(B):
            for q in range(1, T):
                if valid[b, q]:
                    far += float(p[b, h, q, 1 : max(1, q - 63)].sum())
                    real += float(p[b, h, q, 1 : q + 1].sum())
        if real > 0:
            share[h] = far / real
    out["long_range_share"] = share
    return out


def _metrics(batches) -> dict[str, torch.Tensor]:
    acc = MetricAccumulator(1, batches[0].n_heads, names=LONG)
    for batch in batches:
        acc.update(batch)
    return {name: value[0] for name, value in acc.result().items()}


def test_registered_with_a_formula():
    for name in LONG:
        assert METRICS[name].kind == "stream" and METRICS[name].doc
        assert "sum_" in (METRICS[name].fn.__doc__ or ""), name


@pytest.mark.parametrize("T", [70, 600])
def test_equal_loop_definitions_with_padding(T):
    pattern = random_causal(3, 2, T=T, seed=T, scale=2.0)
    valid = torch.arange(T)[None, :] < torch.tensor([[T], [T - 3], [T // 2]])
    got = _metrics([make_batch(pattern, valid=valid)])
    want = _loop(pattern, valid)
    for name in LONG:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_known_heads():
    """Heads that look exactly 100 and 600 back (at the sink until they can), and a
    previous-token head."""
    T = 700
    q = torch.arange(T)
    pattern = torch.zeros(1, 3, T, T)
    for h, d in enumerate((100, 600, 1)):
        far = q > d
        pattern[0, h, q[far], q[far] - d] = 1.0
        pattern[0, h, q[~far], 0] = 1.0
    r = _metrics([make_batch(pattern)])
    # a mean over queries 1..T-1; the 100-back head is far from query 101 on
    n = T - 1
    assert r["attention_beyond_64"].tolist() == pytest.approx([(T - 101) / n, (T - 601) / n, 0.0])
    assert r["attention_beyond_512"].tolist() == pytest.approx([0.0, (T - 601) / n, 0.0])
    # long_range_share ignores the sink: every non-sink weight of the 600-back head is far
    assert r["long_range_share"].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_any_batch_split_gives_the_same_value():
    T = 530
    pattern = random_causal(4, 2, T=T, seed=3)
    valid = torch.arange(T)[None, :] < torch.tensor([[T], [T], [520], [300]])
    one = _metrics([make_batch(pattern, valid=valid)])
    two = _metrics(
        [make_batch(pattern[:1], valid=valid[:1]), make_batch(pattern[1:], valid=valid[1:])]
    )
    for name in LONG:
        torch.testing.assert_close(one[name], two[name], rtol=1e-12, atol=0, equal_nan=True)


def test_short_sequences_have_no_long_range_attention():
    r = _metrics([make_batch(random_causal(2, 2, T=40, seed=1))])
    for name in LONG:
        assert (r[name] == 0).all(), name
