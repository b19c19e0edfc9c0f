"""Per-head example selection and top-token tables: order independence, exact merges, known answers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from headscope.metrics import LayerBatch
from headscope.precompute.examples import (
    BUCKET_EDGES,
    ExampleSelector,
    bucket_of,
    sequence_max_attention,
)
from headscope.precompute.payloads import ExamplePayloads, causal_topk, received_maxima_
from headscope.precompute.toptokens import TopTokens
from tests.unit.test_metrics import make_batch

L, H, N_SEQ = 2, 3, 120


def scores(seed: int = 0) -> torch.Tensor:
    """[L, N_SEQ, H] max-attention scores spread over every bucket, with some exact ties."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(L, N_SEQ, H, generator=g)
    s[:, 10:20] = 0.95  # ties in the top bucket
    s[:, 20:25] = 1.0
    s[:, 30:33] = 0.9  # the lower edge of the top bucket
    return s


def feed(sel: ExampleSelector, s: torch.Tensor, order: torch.Tensor, batch: int) -> None:
    for layer in range(L):
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            sel.offer(layer, idx, s[layer, idx])


def test_order_and_batch_size_do_not_matter():
    s = scores()
    a = ExampleSelector(L, H, top_k=5, per_bucket=3, seed=7)
    feed(a, s, torch.arange(N_SEQ), batch=4)
    b = ExampleSelector(L, H, top_k=5, per_bucket=3, seed=7)
    feed(b, s, torch.randperm(N_SEQ, generator=torch.Generator().manual_seed(1)), batch=13)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a.selected() == b.selected()


def test_merge_of_shards_equals_single_stream():
    s = scores(2)
    single = ExampleSelector(L, H, seed=3)
    feed(single, s, torch.arange(N_SEQ), batch=8)
    perm = torch.randperm(N_SEQ, generator=torch.Generator().manual_seed(5))
    shard_a, shard_b = ExampleSelector(L, H, seed=3), ExampleSelector(L, H, seed=3)
    feed(shard_a, s, perm[:50], batch=7)
    feed(shard_b, s, perm[50:], batch=16)
    shard_b.merge(shard_a)
    for key, value in single.state_dict().items():
        assert torch.equal(value, shard_b.state_dict()[key]), key


def test_top_bucket_is_exact_with_ties_by_sequence_index():
    s = scores()
    sel = ExampleSelector(L, H, top_k=12, per_bucket=2)
    feed(sel, s, torch.randperm(N_SEQ, generator=torch.Generator().manual_seed(9)), batch=6)
    chosen = sel.selected()
    for layer in range(L):
        for head in range(H):
            lo, hi, items = chosen[(layer, head)][0]
            assert (lo, hi) == (0.9, 1.0)
            col = s[layer, :, head]
            ranked = sorted(
                ((int(i), float(col[i])) for i in range(N_SEQ) if col[i] >= 0.9),
                key=lambda t: (-t[1], t[0]),
            )
            assert items == ranked[:12]


def test_other_buckets_are_samples_of_the_right_size():
    s = scores()
    sel = ExampleSelector(L, H, top_k=4, per_bucket=3, seed=0)
    feed(sel, s, torch.arange(N_SEQ), batch=10)
    other_seed = ExampleSelector(L, H, top_k=4, per_bucket=3, seed=1)
    feed(other_seed, s, torch.arange(N_SEQ), batch=10)
    differs = False
    for (layer, head), buckets in sel.selected().items():
        assert [b[:2] for b in buckets] == [
            (BUCKET_EDGES[i], BUCKET_EDGES[i + 1]) for i in reversed(range(10))
        ]
        for (lo, hi, items), (_, _, items2) in zip(
            buckets[1:], other_seed.selected()[(layer, head)][1:], strict=True
        ):
            lo32, hi32 = torch.tensor(lo), torch.tensor(hi)  # float32 edges, like the selector
            in_bucket = [i for i in range(N_SEQ) if lo32 <= s[layer, i, head] < hi32]
            assert len(items) == min(3, len(in_bucket))
            assert {i for i, _ in items} <= set(in_bucket)
            assert [v for _, v in items] == sorted((v for _, v in items), reverse=True)
            differs |= items != items2
    assert differs  # the seed changes the sample


def test_histogram_counts():
    s = scores()
    sel = ExampleSelector(L, H)
    feed(sel, s, torch.arange(N_SEQ), batch=32)
    hist = sel.histograms()
    assert hist.shape == (L, H, 20)
    for layer in range(L):
        for head in range(H):
            col = s[layer, :, head]
            edges = [torch.tensor(i / 20, dtype=torch.float32) for i in range(21)]
            expected = [int(((col >= edges[i]) & (col < edges[i + 1])).sum()) for i in range(20)]
            expected[-1] += int((col == 1.0).sum())
            assert hist[layer, head].tolist() == expected


def test_state_dict_round_trip(tmp_path):
    s = scores()
    sel = ExampleSelector(L, H)
    feed(sel, s, torch.arange(60), batch=9)
    save_file(sel.state_dict(), tmp_path / "ex.safetensors")
    back = ExampleSelector(L, H)
    back.load_state_dict(load_file(tmp_path / "ex.safetensors"))
    assert back.selected() == sel.selected()
    feed(sel, s, torch.arange(60, N_SEQ), batch=9)
    feed(back, s, torch.arange(60, N_SEQ), batch=9)
    assert back.selected() == sel.selected()


def test_bucket_edges():
    x = torch.tensor([0.0, 0.0999, 0.1, 0.5, 0.8999, 0.9, 1.0])  # float32, like attention
    assert bucket_of(x).tolist() == [0, 0, 1, 5, 8, 9, 9]
    assert bucket_of(torch.tensor([0.05, 0.9999]), 20).tolist() == [1, 19]


def test_sequence_max_attention_excludes_key_zero_and_padding():
    T = 5
    a = torch.zeros(2, 1, T, T)
    a[:, :, :, 0] = 1.0  # everyone attends to the sink ...
    a[0, 0, 2] = torch.tensor([0.4, 0.6, 0, 0, 0])  # ... except one row of sequence 0
    a[1, 0, 4] = torch.tensor([0.1, 0.9, 0, 0, 0])  # a padding row of sequence 1
    valid = torch.tensor([[True] * 5, [True] * 4 + [False]])
    batch = LayerBatch(
        0,
        a,
        torch.zeros(2, T, dtype=torch.long),
        torch.zeros(2, T, dtype=torch.bool),
        torch.ones(2, 1, T),
        valid,
    )
    assert sequence_max_attention(batch)[:, 0].tolist() == pytest.approx([0.6, 0.0])


def test_example_payload_sparse_pattern_and_position_maxima():
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.3, 0.7, 0.0, 0.0, 0.0],
            [0.02, 0.49, 0.49, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.4, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],  # padding row: never counts
        ]
    )
    pattern = torch.stack([torch.eye(5), a])[None]  # [1, 2, 5, 5]: head 1 holds a
    valid = torch.tensor([[True, True, True, True, False]])
    batch = make_batch(pattern, valid=valid)
    payloads = ExamplePayloads(top_k=2, threshold=0.35)
    payloads.add(3, batch, torch.tensor([0]), torch.tensor([1]), torch.tensor([17]))
    assert torch.equal(pattern[0, 1], a)  # the batch's pattern is left as it was
    ex = payloads.example(3, 1, 17)
    # top-2 keys per row, those >= 0.35 kept (the 0.49 tie in row 2 keeps both keys)
    assert sorted(map(tuple, ex["sparse"])) == [
        (0, 0, 1.0),
        (1, 1, 0.7),
        (2, 1, 0.49),
        (2, 2, 0.49),
        (3, 3, 0.4),
    ]
    assert ex["max_as_query"] == pytest.approx([0.0, 0.7, 0.49, 0.4], abs=1e-3)  # keys >= 1
    assert ex["max_as_key"] == pytest.approx([0.3, 0.49, 0.3, 0.0], abs=1e-3)  # later queries
    # the same pattern seen through received_maxima_ directly (which overwrites its input)
    assert received_maxima_(a[None].clone(), valid).tolist()[0] == pytest.approx(
        [0.3, 0.49, 0.3, 0.0, 0.0]
    )


# ---------------------------------------------------------------- top tokens
def random_causal_tt(B: int, H: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, T, T, generator=g) * 2
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def toptokens_reference(pattern, tokens, valid):
    """Loop version of the definitions: {(h, side): {token: (sum, count)}}."""
    B, H, T, _ = pattern.shape
    out: dict = {}
    for b in range(B):
        n = int(valid[b].sum())
        for h in range(H):
            for q in range(1, n):
                t = int(tokens[b, q])
                s, c = out.setdefault((h, "query"), {}).get(t, (0.0, 0))
                out[(h, "query")][t] = (s + 1 - float(pattern[b, h, q, 0]), c + 1)
            for k in range(1, n - 1):
                t = int(tokens[b, k])
                got = sum(float(pattern[b, h, q, k]) for q in range(k + 1, n))
                s, c = out.setdefault((h, "key"), {}).get(t, (0.0, 0))
                out[(h, "key")][t] = (s + got, c + 1)
    return out


def test_toptokens_by_hand():
    # one sequence, one head:   positions 0  1  2  3
    tokens = torch.tensor([[9, 5, 7, 5]])
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.2, 0.6, 0.2, 0.0],
            [0.1, 0.3, 0.4, 0.2],
        ]
    )[None, None]
    tt = TopTokens(1, 1)
    tt.update(make_batch(a, tokens))
    top = tt.top_tokens(min_count=1, k=5)[(0, 0)]
    # query mass 1 - A[q, 0]: token 5 at q=1 (0.5) and q=3 (0.9); token 7 at q=2 (0.8)
    assert top["query"] == [(7, pytest.approx(0.8), 1), (5, pytest.approx(0.7), 2)]
    # key mass from later queries: key 1 (token 5) gets 0.6 + 0.3, key 2 (token 7) gets 0.4;
    # key 3 has no later query and key 0 is the sink: both left out
    assert top["key"] == [(5, pytest.approx(0.9), 1), (7, pytest.approx(0.4), 1)]
    assert tt.top_tokens(min_count=2, k=5)[(0, 0)]["query"] == [(5, pytest.approx(0.7), 2)]


def test_toptokens_matches_loop_reference_with_padding():
    B, H, T = 3, 2, 12
    pattern = random_causal_tt(B, H, T, seed=0)
    tokens = torch.randint(0, 6, (B, T), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 8:] = False
    pattern[1, :, 8:] = 0.25  # padding rows hold junk
    tt = TopTokens(2, H)
    tt.update(make_batch(pattern, tokens, valid, layer=1))
    ref = toptokens_reference(pattern, tokens, valid)
    top = tt.top_tokens(min_count=1, k=100)
    for h in range(H):
        for side in ("query", "key"):
            got = {t: (m, c) for t, m, c in top[(1, h)][side]}
            want = {t: (s / c, c) for t, (s, c) in ref[(h, side)].items()}
            assert got.keys() == want.keys()
            for t in want:
                assert got[t][0] == pytest.approx(want[t][0], rel=1e-5)
                assert got[t][1] == want[t][1]
        assert top[(0, h)] == {"query": [], "key": []}  # layer 0 never updated


def test_toptokens_ranking_ties_break_by_token_id():
    T = 6
    a = torch.zeros(1, 1, T, T)
    a[0, 0, :, 0] = 0.5
    a[0, 0, torch.arange(T), torch.arange(T)] += 0.5
    a[0, 0, 0, 0] = 1.0
    tokens = torch.tensor([[0, 40, 30, 20, 10, 50]])
    tt = TopTokens(1, 1)
    tt.update(make_batch(a, tokens))
    assert [t for t, _, _ in tt.top_tokens(min_count=1, k=3)[(0, 0)]["query"]] == [10, 20, 30]


def test_toptokens_merge_equals_sequential_and_state_round_trip(tmp_path):
    B, H, T = 4, 3, 10
    pattern = random_causal_tt(B, H, T, seed=3)
    tokens = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(4))
    seq = TopTokens(1, H)
    first, second = make_batch(pattern[:2], tokens[:2]), make_batch(pattern[2:], tokens[2:])
    seq.update(first)
    seq.update(second)
    a, b = TopTokens(1, H), TopTokens(1, H)
    a.update(second)  # other order: different column layout
    b.update(first)
    a.merge(b)
    sa, ss = a.state_dict(), seq.state_dict()
    assert torch.equal(sa["tokens"], ss["tokens"])
    for key in ss:
        torch.testing.assert_close(sa[key], ss[key], msg=key)
    for key in seq.top_tokens(min_count=1):
        for side in ("query", "key"):
            x = a.top_tokens(min_count=1)[key][side]
            y = seq.top_tokens(min_count=1)[key][side]
            assert [(t, c) for t, _, c in x] == [(t, c) for t, _, c in y]

    save_file(a.state_dict(), tmp_path / "tt.safetensors")
    back = TopTokens(1, H)
    back.load_state_dict(load_file(tmp_path / "tt.safetensors"))
    assert back.top_tokens(min_count=1) == a.top_tokens(min_count=1)
    back.update(make_batch(pattern, tokens))  # keeps working after a load
    assert back.state_dict()["query_count"].sum() == 2 * a.state_dict()["query_count"].sum()


def test_toptokens_tables_hold_only_seen_tokens():
    tt = TopTokens(2, 2)
    tokens = torch.tensor([[100_000, 7, 262_000, 7]])
    tt.update(make_batch(random_causal_tt(1, 2, 4, 0), tokens))
    assert tt.state_dict()["tokens"].tolist() == [7, 262_000]  # position 0 is never counted


def test_causal_topk_equals_topk_on_causal_patterns():
    p = random_causal_tt(3, 1, 300, seed=5)[:, 0]  # [3, 300, 300], continuous: no ties
    for k in (1, 2, 5):
        values, indices = causal_topk(p, k)
        ref_values, ref_indices = p.topk(k, dim=-1)
        assert torch.equal(values, ref_values)
        # rows with fewer than k non-zero keys pick arbitrary zeros: compare where it matters
        nonzero = ref_values > 0
        assert torch.equal(indices[nonzero], ref_indices[nonzero])
