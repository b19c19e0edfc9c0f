"""Q/K/O pair collection and PCA: exact top-N, deterministic ties and signs, planted clusters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from headscope.metrics import LayerBatch
from headscope.precompute.pca import PairCollector, _pca, orient_components


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    T = logits.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def random_inputs(S: int, H: int, T: int, D: int, d_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pattern = causal_softmax(torch.randn(S, H, T, T, generator=g) * 2)
    q = torch.randn(S, H, T, D, generator=g)
    k = torch.randn(S, H, T, D, generator=g)
    v_o = torch.randn(S, H, T, d_out, generator=g)
    tokens = torch.randint(0, 100, (S, T), generator=g)
    valid = torch.ones(S, T, dtype=torch.bool)
    return pattern, q, k, v_o, tokens, valid


def layer_batch(inputs, i: torch.Tensor, layer: int = 0) -> LayerBatch:
    """The sequences ``i`` of ``inputs`` as one layer batch."""
    pattern, q, k, v_o, tokens, valid = inputs
    B, H, T, _ = pattern[i].shape
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[:, 0] = True
    return LayerBatch(
        layer,
        pattern[i],
        tokens[i],
        doc_start,
        torch.ones(B, H, T),
        valid[i],
        seq_idx=i,
        q=q[i],
        k=k[i],
        v_o=v_o[i],
    )


def feed(pc: PairCollector, inputs, order, batch: int, layer: int = 0) -> None:
    for start in range(0, len(order), batch):
        pc.update(layer_batch(inputs, order[start : start + batch], layer))


def brute_force(inputs, N: int):
    """[(head, [(seq, q, k), ...])] the N best pairs per head by (-norm, seq, q, k)."""
    pattern, _, _, v_o, _, valid = inputs
    S, H, T, _ = pattern.shape
    norm = pattern * v_o.norm(dim=-1)[:, :, None, :]
    out = []
    for h in range(H):
        pairs = [
            (-float(norm[s, h, qq, kk]), s, qq, kk)
            for s in range(S)
            for qq in range(1, T)
            for kk in range(1, qq + 1)
            if valid[s, qq]
        ]
        out.append([p[1:] for p in sorted(pairs)[:N]])
    return out


def test_top_pairs_match_brute_force_in_any_order_and_batch_size():
    inputs = random_inputs(S=6, H=2, T=9, D=4, d_out=5, seed=0)
    want = brute_force(inputs, N=15)
    for order, batch in ((torch.arange(6), 6), (torch.tensor([4, 1, 5, 0, 3, 2]), 2)):
        pc = PairCollector(1, 2, d_head=4, d_out=5, n_pairs=15, dtype=torch.float32)
        feed(pc, inputs, order, batch)
        for h in range(2):
            got = [tuple(m[:3]) for m in pc.meta[0, h].tolist()]
            assert got == want[h]


def test_later_stronger_batches_and_padding():
    """Batches arriving after the store is full, with more than N strong pairs each."""
    inputs = list(random_inputs(S=6, H=2, T=9, D=4, d_out=5, seed=5))
    inputs[3] = inputs[3] * torch.linspace(1, 100, 6)[:, None, None, None]  # later = stronger
    inputs[5][2, 6:] = False  # padding at the end of sequence 2
    inputs[5][4, 3:] = False
    want = brute_force(inputs, N=12)
    pc = PairCollector(1, 2, d_head=4, d_out=5, n_pairs=12, dtype=torch.float32)
    feed(pc, inputs, torch.arange(6), batch=2)
    for h in range(2):
        assert [tuple(m[:3]) for m in pc.meta[0, h].tolist()] == want[h]


def test_stored_vectors_and_metadata():
    inputs = random_inputs(S=2, H=1, T=6, D=3, d_out=4, seed=1)
    pattern, q, k, v_o, tokens, _ = inputs
    pc = PairCollector(1, 1, d_head=3, d_out=4, n_pairs=4, dtype=torch.float32)
    feed(pc, inputs, torch.arange(2), 2)
    s, qp, kp, qt, kt = pc.meta[0, 0, 0].tolist()
    assert (qt, kt) == (int(tokens[s, qp]), int(tokens[s, kp]))
    torch.testing.assert_close(pc.q_vec[0, 0, 0], q[s, 0, qp])
    torch.testing.assert_close(pc.k_vec[0, 0, 0], k[s, 0, kp])
    torch.testing.assert_close(pc.o_vec[0, 0, 0], pattern[s, 0, qp, kp] * v_o[s, 0, kp])
    assert pc.norm[0, 0, 0].item() == pytest.approx(pc.o_vec[0, 0, 0].norm().item(), rel=1e-5)


def test_every_point_carries_its_context():
    """Each fitted point has the tokens around its key and its query, read from its own
    sequence: the app's hover needs no stored example. Spans cover key - 6 .. key + 2 and
    query - 6 .. query + 2, cut at the sequence's start and its padding, one span where they
    meet; a merge of two shards keeps the same contexts."""
    S, T = 5, 24
    inputs = list(random_inputs(S=S, H=2, T=T, D=3, d_out=4, seed=7))
    inputs[4] = torch.randint(0, 50_000, (S, T), generator=torch.Generator().manual_seed(3))
    inputs[5][1, 15:] = False  # padding at the end of sequence 1
    tokens, valid = inputs[4], inputs[5]
    pc = PairCollector(1, 2, d_head=3, d_out=4, n_pairs=40, dtype=torch.float32)
    feed(pc, inputs, torch.arange(S), batch=2)
    fits = pc.fit()
    kinds = set()
    for head in range(2):
        points = fits[(0, head)]["points"]
        assert len(points) == 40
        for p in points:
            s, qp, kp = p["sequence"], p["q_pos"], p["k_pos"]
            end = int(valid[s].sum())  # first padding position
            want = {
                pos
                for centre in (qp, kp)
                for pos in range(centre - 6, centre + 3)
                if 0 <= pos < end
            }
            spans = p["context"]
            got = {}
            for span in spans:
                for i, t in enumerate(span["tokens"]):
                    got[span["start"] + i] = t
            assert set(got) == want, (s, qp, kp, spans)
            assert all(got[pos] == int(tokens[s, pos]) for pos in got)
            assert len(spans) == (1 if qp - kp <= 9 else 2)
            kinds.add(len(spans))
    assert kinds == {1, 2}  # both shapes occur
    a = PairCollector(1, 2, d_head=3, d_out=4, n_pairs=40, dtype=torch.float32)
    b = PairCollector(1, 2, d_head=3, d_out=4, n_pairs=40, dtype=torch.float32)
    feed(a, inputs, torch.tensor([3, 0]), batch=2)
    feed(b, inputs, torch.tensor([4, 1, 2]), batch=3)
    a.merge(b)
    assert a.fit() == fits


def test_ties_are_broken_by_sequence_then_positions():
    """Previous-token pattern with unit value norms: every pair has norm 1."""
    S, T = 5, 6
    pattern = torch.zeros(S, 1, T, T)
    pattern[:, 0, 0, 0] = 1.0
    pattern[:, 0, torch.arange(1, T), torch.arange(T - 1)] = 1.0
    v_o = torch.zeros(S, 1, T, 2)
    v_o[..., 0] = 1.0
    inputs = (
        pattern,
        torch.randn(S, 1, T, 2),
        torch.randn(S, 1, T, 2),
        v_o,
        torch.zeros(S, T, dtype=torch.long),
        torch.ones(S, T, dtype=torch.bool),
    )
    pc = PairCollector(1, 1, 2, 2, n_pairs=6, dtype=torch.float32)
    feed(pc, inputs, torch.tensor([3, 1, 4, 0, 2]), batch=2)
    # key 0 never counts, so row 1 (whose previous token is position 0) has no pair
    assert [tuple(m[:3]) for m in pc.meta[0, 0].tolist()] == [
        (0, 2, 1),
        (0, 3, 2),
        (0, 4, 3),
        (0, 5, 4),
        (1, 2, 1),
        (1, 3, 2),
    ]


def test_merge_equals_single_stream_and_state_round_trip(tmp_path):
    inputs = random_inputs(S=8, H=3, T=7, D=4, d_out=6, seed=2)
    single = PairCollector(2, 3, 4, 6, n_pairs=10)
    feed(single, inputs, torch.arange(8), 3, layer=1)
    a, b = PairCollector(2, 3, 4, 6, n_pairs=10), PairCollector(2, 3, 4, 6, n_pairs=10)
    feed(a, inputs, torch.tensor([5, 0, 7]), 2, layer=1)
    feed(b, inputs, torch.tensor([1, 2, 3, 4, 6]), 5, layer=1)
    b.merge(a)
    for key, value in single.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    save_file(b.state_dict(), tmp_path / "pca.safetensors")
    back = PairCollector(2, 3, 4, 6, n_pairs=10)
    back.load_state_dict(load_file(tmp_path / "pca.safetensors"))
    assert back.fit() == b.fit()


def test_planted_clusters_separate_on_pc1_with_fixed_signs():
    S, H, T, D = 4, 1, 10, 8
    g = torch.Generator().manual_seed(3)
    pattern = causal_softmax(torch.randn(S, H, T, T, generator=g))
    direction = torch.zeros(D)
    direction[2] = 1.0
    cluster = (torch.arange(T) % 2 == 0).float() * 2 - 1  # +1 / -1 by query position
    q = 0.1 * torch.randn(S, H, T, D, generator=g) + 5 * cluster[None, None, :, None] * direction
    k = torch.randn(S, H, T, D, generator=g)
    v_o = torch.randn(S, H, T, 16, generator=g)
    tokens = torch.zeros(S, T, dtype=torch.long)
    inputs = (pattern, q, k, v_o, tokens, torch.ones(S, T, dtype=torch.bool))
    pc = PairCollector(1, 1, D, 16, n_pairs=40)
    feed(pc, inputs, torch.arange(S), 2)
    fit = pc.fit()[(0, 0)]
    coords = torch.tensor(fit["q"]["coords"])  # [40, 3]
    assert coords.shape == (40, 3) and len(fit["points"]) == 40
    sides = torch.tensor([1.0 if p["q_pos"] % 2 == 0 else -1.0 for p in fit["points"]])
    pc1 = coords[:, 0]
    assert fit["q"]["variance_ratio"][0] > 0.9
    # the sign convention makes the loading on the planted dimension positive, so the
    # cluster of +direction lies on the positive side
    assert ((pc1 > 0) == (sides > 0)).all()
    assert all(p["distance"] == p["q_pos"] - p["k_pos"] for p in fit["points"])


def test_randomized_pca_matches_exact_for_wide_vectors():
    g = torch.Generator().manual_seed(4)
    G, N, d = 3, 60, 300  # d > 128: randomized path
    x = (
        torch.randn(G, N, 5, generator=g)
        * torch.tensor([9.0, 5.0, 3.0, 1.0, 0.5])
        @ torch.randn(G, 5, d, generator=g)
    )
    x = x + 0.01 * torch.randn(G, N, d, generator=g)
    mask = torch.ones(G, N, dtype=torch.bool)
    mask[1, 50:] = False
    coords, ratio = _pca(x, mask, 3)
    for i in range(G):
        n = int(mask[i].sum())
        xc = x[i, :n].double() - x[i, :n].double().mean(0)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        want = xc @ orient_components(vh[:3]).T
        torch.testing.assert_close(coords[i, :n].double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ratio[i], (s[:3] ** 2) / (s**2).sum(), rtol=1e-6, atol=1e-9)
        assert (coords[i, n:] == 0).all()


def test_pca_of_too_few_points_pads_with_zeros():
    x = torch.randn(1, 4, 2)
    mask = torch.tensor([[True, True, False, False]])
    coords, ratio = _pca(x, mask, 3)
    assert coords.shape == (1, 4, 3) and (coords[0, :, 2] == 0).all() and ratio[0, 2] == 0


def test_output_basis_is_an_isometry_of_w_o():
    """v @ U S has the norms and pairwise geometry of v @ W_O (so the same PCA)."""
    from tests.tiny_models import tiny_adapter

    ad = tiny_adapter("llama")
    v = torch.randn(50, ad.spec.n_heads, ad.spec.d_head)
    full = torch.einsum("nhd,hdm->nhm", v, ad.weights(1).W_O)
    small = torch.einsum("nhd,hde->nhe", v, ad.output_basis(1))
    assert torch.allclose(full.norm(dim=-1), small.norm(dim=-1), atol=1e-5)
    gram_full = torch.einsum("nhm,khm->hnk", full, full)
    gram_small = torch.einsum("nhe,khe->hnk", small, small)
    assert torch.allclose(gram_full, gram_small, atol=1e-4)
