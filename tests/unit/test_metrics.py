"""Streaming pattern metrics on hand-made patterns whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from headscope.metrics import (
    METRICS,
    LayerBatch,
    MetricAccumulator,
    TokenMatches,
    metric_docs,
    register_metric,
    stream_metric_names,
)

REQUIRED = {
    "self_attention_score",
    "prev_token_score",
    "bos_score",
    "pattern_entropy",
    "qk_distance",
    "qk_distance_variance",
    "induction_score",
    "induction_mass",
    "duplicate_token_score",
    "max_attention",
    "output_norm",
}


# ---------------------------------------------------------------- pattern builders [T, T]
def prev_token(T: int) -> torch.Tensor:
    a = torch.zeros(T, T)
    a[0, 0] = 1.0
    a[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    return a


def uniform(T: int) -> torch.Tensor:
    a = torch.ones(T, T).tril()
    return a / a.sum(-1, keepdim=True)


def bos(T: int) -> torch.Tensor:
    a = torch.zeros(T, T)
    a[:, 0] = 1.0
    return a


def random_causal(*shape: int, T: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, T, T, generator=g) * scale
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def make_batch(pattern, tokens=None, valid=None, out_norm=None, layer=0) -> LayerBatch:
    """pattern: [B, H, T, T]; defaults: distinct tokens, all valid, output norm 1."""
    B, H, T, _ = pattern.shape
    if tokens is None:
        tokens = torch.arange(B * T).view(B, T) + 10
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    if out_norm is None:
        out_norm = torch.ones(B, H, T)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[:, 0] = True
    return LayerBatch(layer, pattern, tokens, doc_start, out_norm, valid)


def run(batch: LayerBatch, n_layers: int = 1) -> dict[str, torch.Tensor]:
    acc = MetricAccumulator(n_layers, batch.n_heads)
    acc.update(batch)
    return {k: v[batch.layer] for k, v in acc.result().items()}


# ---------------------------------------------------------------- registry
def test_registry_has_required_metrics_with_docs():
    assert set(stream_metric_names()) >= REQUIRED
    docs = metric_docs("stream")
    for name in REQUIRED:
        assert docs[name] and "\n" not in docs[name]
        assert METRICS[name].kind == "stream"
    assert (
        docs["prev_token_score"] == "Mean attention from each token to the token right before it."
    )


def test_register_rejects_duplicates_missing_docs_and_bad_kinds():
    with pytest.raises(ValueError, match="already registered"):
        register_metric("prev_token_score")(lambda b: None)
    with pytest.raises(ValueError, match="docstring"):

        @register_metric("_undocumented_test_metric")
        def f(batch):
            return None

    with pytest.raises(ValueError, match="kind"):
        register_metric("_x", kind="nope")  # type: ignore[arg-type]
    assert "_undocumented_test_metric" not in METRICS


def test_layer_batch_checks_shapes():
    p = uniform(5)[None, None]
    with pytest.raises(ValueError, match="tokens"):
        LayerBatch(
            0,
            p,
            torch.zeros(1, 4, dtype=torch.long),
            torch.zeros(1, 5, dtype=torch.bool),
            torch.ones(1, 1, 5),
            torch.ones(1, 5, dtype=torch.bool),
        )


# ---------------------------------------------------------------- known answers
def test_prev_token_head():
    T = 16
    r = run(make_batch(prev_token(T)[None, None].repeat(2, 1, 1, 1)))
    assert r["prev_token_score"].item() == pytest.approx(1.0)
    assert r["self_attention_score"].item() == pytest.approx(0.0)
    # row 1's previous token is position 0: 1 of the T - 1 counted rows
    assert r["bos_score"].item() == pytest.approx(1 / (T - 1))
    assert r["pattern_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert r["qk_distance"].item() == pytest.approx(1.0)
    assert r["qk_distance_variance"].item() == pytest.approx(0.0, abs=1e-6)
    # row 1 can only reach key 0 besides itself, so its max (key 0 excluded) is 0
    assert r["max_attention"].item() == pytest.approx((T - 2) / (T - 1))


def test_uniform_head():
    T = 12
    r = run(make_batch(uniform(T)[None, None]))
    q = torch.arange(1, T, dtype=torch.float64)
    assert r["pattern_entropy"].item() == pytest.approx(torch.log(q + 1).mean().item(), rel=1e-5)
    assert r["bos_score"].item() == pytest.approx((1 / (q + 1)).mean().item(), rel=1e-5)
    assert r["self_attention_score"].item() == pytest.approx((1 / (q + 1)).mean().item(), rel=1e-5)
    assert r["qk_distance"].item() == pytest.approx((q / 2).mean().item(), rel=1e-5)
    var = (((q + 1) ** 2 - 1) / 12).mean().item()  # discrete uniform on q + 1 points
    assert r["qk_distance_variance"].item() == pytest.approx(var, rel=1e-4)


def test_output_norm_includes_position_zero_and_skips_padding():
    T = 6
    norms = torch.arange(T, dtype=torch.float32).view(1, 1, T)
    valid = torch.tensor([[True] * 4 + [False] * 2])
    r = run(make_batch(uniform(T)[None, None], valid=valid, out_norm=norms))
    assert r["output_norm"].item() == pytest.approx((0 + 1 + 2 + 3) / 4)


def repeated_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """[1, 2n + 1]: a BOS token, then n distinct random tokens, then the same n again."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randperm(1000, generator=g)[:n] + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), r, r])[None]


def test_induction_and_duplicate_on_repeated_sequence():
    n = 30
    tokens = repeated_tokens(n)
    T = tokens.shape[1]
    induction, duplicate = bos(T), bos(T)
    for q in range(n + 1, T):  # second copy: token r_i at q = n + 1 + i
        induction[q] = 0
        induction[q, q - n + 1] = 1.0  # the token after the first copy
        duplicate[q] = 0
        duplicate[q, q - n] = 1.0  # the first copy itself
    pattern = torch.stack([induction, uniform(T), duplicate])[None]  # [1, 3, T, T]
    r = run(make_batch(pattern, tokens=tokens))
    ind, dup = r["induction_score"], r["duplicate_token_score"]
    assert ind[0].item() == pytest.approx(1.0)
    assert ind[1].item() < 0.05
    assert ind[2].item() == pytest.approx(0.0)
    assert dup[2].item() == pytest.approx(1.0)
    assert dup[0].item() == pytest.approx(0.0)
    assert dup[1].item() < 0.05


def test_pair_mean_and_query_mass_differ_by_hand():
    """Query 5 has two induction keys; the pairwise mean counts both, the mass adds them."""
    #                   0  1  2  3  4  5
    tokens = torch.tensor([[0, 5, 6, 5, 6, 5]])
    a = bos(6)
    a[3], a[4], a[5] = 0.0, 0.0, 0.0
    a[3, 2] = 1.0  # token 5 at 3: the token after the earlier 5 (at 1) is at 2
    a[4, 3] = 1.0  # token 6 at 4: after the earlier 6 (at 2) -> 3
    a[5, 2] = a[5, 4] = 0.5  # token 5 at 5: after the earlier 5s (at 1 and 3) -> 2 and 4
    r = run(make_batch(a[None, None], tokens=tokens))
    # pairs (3, 2) (4, 3) (5, 2) (5, 4): (1 + 1 + 0.5 + 0.5) / 4; queries 3, 4, 5: (1 + 1 + 1) / 3
    assert r["induction_score"].item() == pytest.approx(0.75)
    assert r["induction_mass"].item() == pytest.approx(1.0)
    # duplicate pairs (3, 1) (4, 2) (5, 1) (5, 3) get no attention at all
    assert r["duplicate_token_score"].item() == pytest.approx(0.0)


def direct_token_scores(
    pattern: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor
) -> dict[str, list[float]]:
    """The token-match scores by their definitions, one (query, key) pair at a time."""
    B, H, T, _ = pattern.shape
    p, tok = pattern.double().tolist(), tokens.tolist()
    pair_sum = {"induction": [0.0] * H, "duplicate": [0.0] * H}
    pair_count = {"induction": 0, "duplicate": 0}
    mass_sum, mass_count = [0.0] * H, 0
    for b in range(B):
        for q in range(T):
            if not valid[b, q]:
                continue
            keys = {
                "induction": [k for k in range(1, q) if tok[b][k - 1] == tok[b][q]],
                "duplicate": [k for k in range(1, q) if tok[b][k] == tok[b][q]],
            }
            for kind, ks in keys.items():
                pair_count[kind] += len(ks)
                for h in range(H):
                    pair_sum[kind][h] += sum(p[b][h][q][k] for k in ks)
            if keys["induction"]:
                mass_count += 1
                for h in range(H):
                    mass_sum[h] += sum(p[b][h][q][k] for k in keys["induction"])
    return {
        "induction_score": [x / pair_count["induction"] for x in pair_sum["induction"]],
        "duplicate_token_score": [x / pair_count["duplicate"] for x in pair_sum["duplicate"]],
        "induction_mass": [x / mass_count for x in mass_sum],
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_scores_equal_direct_definitions(seed):
    """Random patterns over a small vocabulary (many repeats, several copies per query), packed
    documents that each start with the same BOS token (matches across documents count), and
    padding with garbage rows."""
    g = torch.Generator().manual_seed(seed)
    B, H, T = 4, 3, 40
    pattern = random_causal(B, H, T=T, seed=seed)
    tokens = torch.randint(1, 6, (B, T), generator=g)
    doc_start = torch.rand(B, T, generator=g) < 0.1
    doc_start[:, 0] = True
    tokens[doc_start] = 0  # every document starts with BOS
    valid = torch.arange(T)[None, :] < torch.tensor([[T], [T - 7], [25], [T]])
    pattern[~valid[:, None, :, None].expand(B, H, T, T)] = 0.3  # padding rows must not matter
    out_norm = torch.ones(B, H, T)
    batch = LayerBatch(0, pattern, tokens, doc_start, out_norm, valid)
    r = run(batch)
    want = direct_token_scores(pattern, tokens, valid)
    for name, value in want.items():
        assert r[name].tolist() == pytest.approx(value, rel=1e-9), name
    # with several copies per query, the pair mean and the per-query mass really differ
    assert not torch.allclose(r["induction_score"], r["induction_mass"])


def test_pair_mean_and_query_mass_rank_heads_alike():
    """Both divide the same per-head total by a count that depends only on the tokens, so over a
    whole stream they differ by one factor for every head and layer: a rescaling, never a
    re-ranking."""
    acc = MetricAccumulator(2, 3, names=["induction_score", "induction_mass"])
    g = torch.Generator().manual_seed(5)
    for seed in range(3):
        tokens = torch.randint(0, 4, (2, 30), generator=g)
        for layer in range(2):
            pattern = random_causal(2, 3, T=30, seed=10 * seed + layer)
            acc.update(make_batch(pattern, tokens=tokens, layer=layer))
    r = acc.result()
    ratio = r["induction_score"] / r["induction_mass"]  # [L, H]
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))
    assert ratio[0, 0] < 1  # several pairs per matched query


def test_token_matches_by_hand():
    #                   0  1  2  3  4  5
    tokens = torch.tensor([[0, 5, 6, 5, 6, 5]])
    m = TokenMatches.from_tokens(tokens, torch.ones(1, 6, dtype=torch.bool))
    dup = set(zip(m.dup_q.tolist(), m.dup_k.tolist(), strict=True))
    ind = set(zip(m.ind_q.tolist(), m.ind_k.tolist(), strict=True))
    assert dup == {(3, 1), (4, 2), (5, 1), (5, 3)}
    # q=3 (token 5): earlier 5 at 1 -> key 2; q=4 (6): earlier 6 at 2 -> key 3;
    # q=5 (5): earlier 5s at 1, 3 -> keys 2, 4
    assert ind == {(3, 2), (4, 3), (5, 2), (5, 4)}


def test_matches_skip_key_zero_and_padding():
    tokens = torch.tensor([[7, 7, 7, 7]])
    valid = torch.tensor([[True, True, True, False]])
    m = TokenMatches.from_tokens(tokens, valid)
    assert set(zip(m.dup_q.tolist(), m.dup_k.tolist(), strict=True)) == {(2, 1)}
    assert set(zip(m.ind_q.tolist(), m.ind_k.tolist(), strict=True)) == {(2, 1)}


def test_shared_matches_give_same_result():
    pattern = random_causal(2, 3, T=20)
    tokens = torch.randint(0, 4, (2, 20), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 20, dtype=torch.bool)
    a = run(make_batch(pattern, tokens=tokens))
    shared = make_batch(pattern, tokens=tokens)
    shared = LayerBatch(
        0,
        pattern,
        tokens,
        shared.doc_start,
        shared.head_out_norm,
        valid,
        matches=TokenMatches.from_tokens(tokens, valid),
    )
    b = run(shared)
    for name in a:
        torch.testing.assert_close(a[name], b[name], equal_nan=True)


def test_padding_is_excluded():
    T, n_valid = 24, 15
    pattern = random_causal(1, 4, T=T, seed=3)
    tokens = torch.randint(0, 5, (1, T), generator=torch.Generator().manual_seed(4))
    norms = torch.rand(1, 4, T, generator=torch.Generator().manual_seed(5))
    valid = torch.zeros(1, T, dtype=torch.bool)
    valid[:, :n_valid] = True
    padded = pattern.clone()
    padded[:, :, n_valid:] = torch.rand(1, 4, T - n_valid, T)  # garbage rows must not matter
    full = run(make_batch(padded, tokens=tokens, valid=valid, out_norm=norms))
    s = slice(0, n_valid)
    short = run(
        make_batch(pattern[:, :, s, s], tokens=tokens[:, s], out_norm=norms[:, :, s].contiguous())
    )
    for name in full:
        # float32 sums over rows of different length round differently
        torch.testing.assert_close(full[name], short[name], rtol=1e-5, atol=1e-6, msg=name)


def test_scores_are_fractions_on_random_patterns():
    pattern = random_causal(3, 5, T=40, seed=7)
    tokens = torch.randint(0, 6, (3, 40), generator=torch.Generator().manual_seed(8))
    r = run(make_batch(pattern, tokens=tokens))
    for name in ("self_attention_score", "prev_token_score", "bos_score", "max_attention"):
        assert ((r[name] >= 0) & (r[name] <= 1)).all(), name
    for name in ("induction_score", "induction_mass", "duplicate_token_score"):
        assert ((r[name] >= 0) & (r[name] <= 1 + 1e-6)).all(), name
    assert (r["pattern_entropy"] <= math.log(40)).all()
    assert (r["qk_distance_variance"] >= 0).all()


def test_heads_are_independent():
    """One batch holding several different heads gives each head its own answer."""
    T = 10
    pattern = torch.stack([prev_token(T), uniform(T), bos(T)])[None]
    r = run(make_batch(pattern))
    uniform_prev = (1 / torch.arange(2, T + 1)).mean().item()
    # the BOS head's row 1 attends to position 0, which is also its previous token
    assert r["prev_token_score"].tolist() == pytest.approx([1.0, uniform_prev, 1 / (T - 1)])
    assert r["bos_score"][2].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- accumulator
def _two_batches():
    T = 20
    p = random_causal(5, 3, T=T, seed=11)
    tok = torch.randint(0, 8, (5, T), generator=torch.Generator().manual_seed(12))
    valid = torch.ones(5, T, dtype=torch.bool)
    valid[3, 14:] = False
    norms = torch.rand(5, 3, T, generator=torch.Generator().manual_seed(13))
    whole = make_batch(p, tok, valid, norms, layer=1)
    first = make_batch(p[:2], tok[:2], valid[:2], norms[:2], layer=1)
    second = make_batch(p[2:], tok[2:], valid[2:], norms[2:], layer=1)
    return whole, first, second


def test_two_batches_equal_one_batch():
    whole, first, second = _two_batches()
    one = MetricAccumulator(2, 3)
    one.update(whole)
    two = MetricAccumulator(2, 3)
    two.update(first)
    two.update(second)
    for name, value in one.result().items():
        torch.testing.assert_close(value, two.result()[name], equal_nan=True, msg=name)
    assert torch.isnan(one.result()["prev_token_score"][0]).all()  # layer 0 never seen


def test_merge_equals_sequential_and_state_round_trip(tmp_path):
    _, first, second = _two_batches()
    seq = MetricAccumulator(2, 3)
    seq.update(first)
    seq.update(second)
    a, b = MetricAccumulator(2, 3), MetricAccumulator(2, 3)
    a.update(first)
    b.update(second)
    a.merge(b)
    for key, value in seq.state_dict().items():
        torch.testing.assert_close(value, a.state_dict()[key], rtol=0, atol=1e-12)

    save_file(a.state_dict(), tmp_path / "acc.safetensors")
    c = MetricAccumulator(2, 3)
    c.load_state_dict(load_file(tmp_path / "acc.safetensors"))
    for name, value in a.result().items():
        torch.testing.assert_close(value, c.result()[name], equal_nan=True, rtol=0, atol=0)


def test_merge_rejects_mismatch():
    with pytest.raises(ValueError):
        MetricAccumulator(2, 3).merge(MetricAccumulator(2, 4))
    with pytest.raises(KeyError):
        MetricAccumulator(2, 3, names=["no_such_metric"])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(2, 5),
    T=st.integers(2, 12),
    split=st.integers(1, 4),
)
def test_any_batch_split_gives_the_same_metrics(seed, B, T, split):
    split = min(split, B - 1)
    g = torch.Generator().manual_seed(seed)
    p = random_causal(B, 2, T=T, seed=seed)
    tok = torch.randint(0, 3, (B, T), generator=g)
    valid = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)
    norms = torch.rand(B, 2, T, generator=g)
    one, two = MetricAccumulator(1, 2), MetricAccumulator(1, 2)
    one.update(make_batch(p, tok, valid, norms))
    two.update(make_batch(p[:split], tok[:split], valid[:split], norms[:split]))
    two.update(make_batch(p[split:], tok[split:], valid[split:], norms[split:]))
    for name, value in one.result().items():
        torch.testing.assert_close(value, two.result()[name], equal_nan=True, msg=name)


def test_single_token_sequences_have_no_pattern_metrics():
    r = run(make_batch(torch.ones(2, 3, 1, 1)))
    for name, value in r.items():
        if name == "output_norm":
            assert value.tolist() == [1.0, 1.0, 1.0]
        else:
            assert torch.isnan(value).all(), name  # no eligible query: NaN, not a fake 0


@pytest.mark.parametrize("T", [64, 45])  # a multiple of the key group, and not
def test_row_reductions_match_direct_definitions(T):
    from headscope.metrics.rows import KEY_GROUP, row_reductions

    p = random_causal(3, 4, T=T, seed=7)
    p[1, 2] = torch.eye(T)  # a sharp head: entropy 0, moments on the diagonal
    valid = torch.ones(3, T, dtype=torch.bool)
    valid[2, T - 9 :] = False  # padding at the end of one sequence
    r = row_reductions(p, valid)
    d = p.double()
    entropy = -(d * d.clamp_min(1e-300).log()).sum(-1)
    assert torch.allclose(r.entropy.double(), entropy, atol=1e-5)
    row_max = torch.zeros(3, 4, T, dtype=torch.float64)
    row_max[..., 1:] = d[..., 1:, 1:].amax(-1)
    assert torch.equal(r.row_max.double(), row_max)
    k = torch.arange(T, dtype=torch.float64)
    dist = k[:, None] - k[None, :]  # [T(q), T(k)]
    assert torch.allclose(r.moments[..., 0].double(), (d * dist).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(r.moments[..., 1].double(), (d * dist**2).sum(-1), rtol=1e-5, atol=1e-4)
    later = torch.ones(T, T, dtype=torch.bool).tril(-1)  # q > k
    received = (d * later * valid[:, None, :, None]).sum(-2)
    assert torch.allclose(r.received.double(), received, atol=1e-5)
    if T % KEY_GROUP:
        assert r.group_max is None
    else:
        assert r.group_max is not None
        assert torch.equal(r.group_max, p.unflatten(-1, (T // KEY_GROUP, KEY_GROUP)).amax(-1))


@pytest.mark.parametrize("T", [12, 64, 130])
def test_row_reductions_do_not_depend_on_the_batch_split(T):
    from headscope.metrics.rows import row_reductions

    p = random_causal(8, 3, T=T, seed=T)
    valid = torch.ones(8, T, dtype=torch.bool)
    full = row_reductions(p, valid)
    for split in (1, 3, 7):
        a, b = row_reductions(p[:split], valid[:split]), row_reductions(p[split:], valid[split:])
        for name in ("entropy", "row_max", "moments", "received"):
            joined = torch.cat([getattr(a, name), getattr(b, name)])
            assert torch.equal(joined, getattr(full, name)), (name, split)


def test_distance_variance_is_exact_for_a_local_head_far_into_the_sequence():
    T = 512
    p = torch.zeros(1, 1, T, T)
    p[0, 0, 0, 0] = 1.0
    q = torch.arange(1, T)
    p[0, 0, q, q - 1] = 0.5  # half on the previous token, half on the one before: variance 0.25
    p[0, 0, q, (q - 2).clamp_min(0)] += 0.5
    r = run(make_batch(p))
    # query 1 sees distances 1 and 1 (key 0 twice): variance 0 there, 0.25 everywhere else
    assert r["qk_distance_variance"].item() == pytest.approx(0.25 * (T - 2) / (T - 1), rel=1e-6)
